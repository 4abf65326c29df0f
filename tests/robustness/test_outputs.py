"""Where the output goes: existing, unwritable, full, the current folder, a file, the input itself —
refused or failed with one line, nothing partial left, nothing previous lost."""

import contextlib
import errno
import subprocess

import pytest

from minicpm_compress import manifest

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
