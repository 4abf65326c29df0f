"""Where the output goes: existing, unwritable, full, the current folder, a file, the input itself —
refused or failed with one line, nothing partial left, nothing previous lost."""

import contextlib
import errno
import subprocess

import pytest

from minicpm_compress import manifest
from minicpm_compress.manifest_schema import read_manifest

from .conftest import SMALL, assert_refused, cli, leftovers


def _rtn(model, out, *flags, cwd=None):
    return cli("rtn", "--model", model, "--bits", "4", "--group-size", "32", "--out", out, *SMALL, *flags, cwd=cwd)


def test_existing_folder_needs_overwrite_and_is_kept(tmp_path, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    assert_refused(_rtn(checkpoint, out), 2, str(out), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(out) == []


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("target", [".", "..", "./"])
def test_the_current_folder_or_above_is_refused_before_any_work(tmp_path, checkpoint, target, overwrite):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    result = _rtn(checkpoint, target, *(["--overwrite"] if overwrite else []), cwd=work)
    assert_refused(result, 2, "current folder")
    assert (work / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama", "work"]  # no staging folder anywhere


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_onto_a_regular_file(tmp_path, checkpoint, overwrite):
    target = tmp_path / "result"
    target.write_text("a file the user cares about")
    result = _rtn(checkpoint, target, *(["--overwrite"] if overwrite else []))
    assert_refused(result, 2, str(target), "not a folder")
    assert target.read_text() == "a file the user cares about" and leftovers(target) == []


@pytest.mark.parametrize("where", ["model", "inside model"])
def test_output_over_the_input_is_refused(tmp_path, checkpoint, where):
    out = checkpoint if where == "model" else checkpoint / "out"
    before = sorted(p.name for p in checkpoint.iterdir())
    assert_refused(_rtn(checkpoint, out, "--overwrite"), 2, "overlaps the input")
    assert sorted(p.name for p in checkpoint.iterdir()) == before


def test_output_below_a_regular_file(tmp_path, checkpoint):
    (tmp_path / "afile").write_text("x")
    assert_refused(_rtn(checkpoint, tmp_path / "afile" / "out"), 2, "afile", "cannot create the output folder")


def test_output_under_proc(tmp_path, checkpoint):
    assert_refused(_rtn(checkpoint, "/proc/minicpm-compress-out"), 2, "/proc/minicpm-compress-out", "cannot create")


@contextlib.contextmanager
def _mounted_tmpfs(path, options):
    """A small tmpfs at `path` (tests run as root here and in CI); skips where mounting is not allowed."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (the simulated-failure tests below still run)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_destination(tmp_path, checkpoint):
    with _mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        assert_refused(_rtn(checkpoint, ro / "out"), 2, "out", "cannot create the output folder", "Read-only")


def test_disk_full_while_writing_the_output_folder(tmp_path, checkpoint):
    with _mounted_tmpfs(tmp_path / "small", "size=32k") as small:
        out = small / "out"
        line = assert_refused(_rtn(checkpoint, out), 4, "No space left on device", str(out), out=out)
        assert "nothing was written" in line
        assert list(small.iterdir()) == []  # the staging folder is gone too, freeing the space


def test_exporter_refused_before_writing_when_the_disk_is_too_small(tmp_path, checkpoint):
    with _mounted_tmpfs(tmp_path / "small", "size=256k") as small:
        out = small / "out"
        result = cli("export", "gguf", "--model", checkpoint, "--type", "F32", "--out", out, *SMALL)
        assert_refused(result, 4, "stage 'gguf' writes up to about", "free", out=out)
        result = cli("export", "gguf", "--model", checkpoint, "--type", "F32", "--out", out, *SMALL, "--no-memory-check")
        assert_refused(result, 4, "No space left on device", out=out)  # told to go on, it fails cleanly
        assert list(small.iterdir()) == []


def test_simulated_disk_full(tmp_path, checkpoint, monkeypatch):
    """The same failure without a mount: the quantized-weights write raises ENOSPC."""

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "quantized.safetensors"))

    monkeypatch.setattr(manifest, "save_qweights", full)
    out = tmp_path / "out"
    assert_refused(_rtn(checkpoint, out), 4, "quantized.safetensors", "No space left on device", out=out)


def test_overwrite_replaces_only_on_success(tmp_path, checkpoint):
    out = tmp_path / "out"
    assert _rtn(checkpoint, out).exit_code == 0
    first = (out / "quantized.safetensors").read_bytes()
    result = _rtn(checkpoint, out, "--overwrite")
    assert result.exit_code == 0 and (out / "quantized.safetensors").read_bytes() == first and leftovers(out) == []


@pytest.mark.parametrize("marker", [None, "{}", '{"tool": {"name": "something-else"}}', "not json"])
def test_overwrite_replaces_only_our_output_folders(tmp_path, checkpoint, marker):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 a file the tool never wrote")
    if marker is not None:
        (out / "manifest.json").write_text(marker)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_refused(_rtn(checkpoint, out, "--overwrite"), 2, str(out), "not an output folder")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(out) == []


def test_overwrite_replaces_an_earlier_output_folder(tmp_path, checkpoint):
    out = tmp_path / "out"
    assert _rtn(checkpoint, out).exit_code == 0
    (out / "stray.txt").write_text("x")  # still ours: it holds our manifest
    assert _rtn(checkpoint, out, "--overwrite").exit_code == 0
    assert not (out / "stray.txt").exists() and (out / "manifest.json").is_file() and leftovers(out) == []


def test_a_destination_another_run_is_writing_is_refused(tmp_path, checkpoint):
    """The lock is held by a live process (here a child that holds it and waits): the second run exits with
    one line naming the folder and the holder, and writes nothing."""
    import os
    import sys

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom minicpm_compress import atomic\n"
                               f"with atomic.exclusive(__import__('pathlib').Path({str(out)!r})):\n"
                               "    print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_refused(_rtn(checkpoint, out), 2, str(out), f"pid {holder.pid}", "another minicpm-compress run")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead holder's lock: the next run goes ahead and removes the lock file
    assert _rtn(checkpoint, out).exit_code == 0 and leftovers(out) == []
    assert os.listdir(tmp_path).count(".out.lock") == 0


def test_two_identical_commands_at_once_one_wins_nothing_lost(tmp_path, checkpoint):
    import sys

    out = tmp_path / "out"
    command = [sys.executable, "-c", "from minicpm_compress.cli import main; main()", "rtn", "--model", str(checkpoint),
               "--bits", "4", "--group-size", "32", "--out", str(out), *SMALL]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in runs)
    assert [code for code, _ in results] == [0, 2], results
    errors = [line for line in results[1][1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0] and "Traceback" not in results[1][1], results[1][1]
    assert read_manifest(out / "manifest.json")["status"] == "passed" and leftovers(out) == []


@pytest.mark.parametrize("left", ["partial", "old"])
def test_what_a_killed_run_left_beside_the_output_is_cleaned_up(tmp_path, checkpoint, left):
    """A `.out.*.partial` staging folder is removed; a `.out.old-PID` backup whose run died between its two
    renames is the previous output and is put back (then, without --overwrite, kept and refused)."""
    out = tmp_path / "out"
    if left == "partial":
        stale = tmp_path / ".out.k3j4x9_a.partial"
        stale.mkdir()
        (stale / "model.onnx.data").write_bytes(b"0" * 1000)
        assert _rtn(checkpoint, out).exit_code == 0
        assert leftovers(out) == [] and (out / "manifest.json").is_file()
    else:
        assert _rtn(checkpoint, tmp_path / "earlier").exit_code == 0
        (tmp_path / "earlier").rename(tmp_path / ".out.old-999999")
        assert_refused(_rtn(checkpoint, out), 2, str(out), "--overwrite")
        assert read_manifest(out / "manifest.json")["status"] == "passed" and leftovers(out) == []


def test_staging_folders_of_other_destinations_are_left_alone(tmp_path, checkpoint):
    other = tmp_path / ".out.v2.k3j4x9_a.partial"  # the staging folder of `out.v2`, not of `out`
    other.mkdir()
    assert _rtn(checkpoint, tmp_path / "out").exit_code == 0
    assert other.is_dir()
