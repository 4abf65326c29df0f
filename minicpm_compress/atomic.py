"""Write files and folders so that readers see either nothing or the complete result."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` (ordinary permissions) when the block
    completes, removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def copy_file(source: Path, path: Path) -> None:
    """`source` copied to `path` through a temporary name (streamed: no whole file in memory)."""
    with replacing(path) as tmp:
        shutil.copyfile(source, tmp)


OUTPUT_MARKER = "manifest.json"  # what makes a folder one of this tool's output folders
TOOL_NAME = "minicpm-compress"


def is_output_folder(folder: Path) -> bool:
    """`folder` holds this tool's manifest (an output folder, or the record of a failed run)."""
    try:
        manifest = json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8"))
        return isinstance(manifest, dict) and (manifest.get("tool") or {}).get("name") == TOOL_NAME
    except (OSError, ValueError, AttributeError):
        return False


def own_cache(folder: Path) -> bool:
    """For folders under the tool's own cache: everything there is the tool's to replace."""
    return True


def check_destination(final: Path, overwrite: bool = False, inputs: tuple[Path, ...] = (),
                      replaceable: Callable[[Path], bool] = is_output_folder) -> None:
    """Refuse, before any work, an output folder that could not be written or would destroy something.

    Refused: a regular file; the current folder or one above it; a folder holding (or inside) one of the
    `inputs`; an existing non-empty folder without `overwrite`, or with it when `replaceable` says the
    folder is not ours to replace (by default: it holds no manifest of this tool)."""
    from .errors import CompressError

    final = Path(final)
    target = final.resolve()
    if final.exists() and not final.is_dir():
        raise CompressError(f"{final}: exists and is not a folder; choose a new output folder "
                            "(--overwrite replaces only output folders)")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise CompressError(f"{final}: is the current folder or one above it; choose a new output folder")
    for source in inputs:
        source = Path(source).resolve()
        if target == source or target in source.parents or source in target.parents:
            raise CompressError(f"{final}: overlaps the input {source}; choose a folder outside it")
    if final.exists() and any(final.iterdir()):
        if not overwrite:
            raise CompressError(f"{final}: output folder exists and is not empty (pass --overwrite to replace it)")
        if not replaceable(final):
            raise CompressError(f"{final}: not an output folder of {TOOL_NAME} (no {OUTPUT_MARKER} of ours); "
                                "--overwrite replaces only those: choose a new output folder or empty this one")


# ---------------------------------------------------------------- one writer per destination


def lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


@contextlib.contextmanager
def exclusive(final: Path, wait: bool = False) -> Iterator[None]:
    """Hold the lock of destination `final` (`.NAME.lock` beside it, removed on release).

    Without `wait`, a destination another live process is writing is refused with one line naming it and
    that process. The kernel drops the lock of a process that dies, so a killed run never blocks a rerun.
    """
    import fcntl

    from .errors import CompressError, DestinationBusy

    final = Path(final)
    path = lock_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompressError(f"{final}: cannot create the output folder here ({e.strerror})") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            raise CompressError(f"{final}: cannot create the output folder here ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DestinationBusy(f"{final}: another minicpm-compress run (pid {holder}) is writing it now; wait for it "
                                "to finish or choose another output folder") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder removed while we waited for it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:[a-z0-9_]{8}\.partial|old-\d+)$")


def remove_stale(final: Path) -> list[Path]:
    """Staging (`.NAME.*.partial`) and backup (`.NAME.old-PID`) folders of `final` left by a run that was
    killed; call only while holding `final`'s lock (so no live run owns them). A backup whose rename back
    never happened (the run died between its two renames) is put back as `final`; the rest are removed."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in sorted(final.parent.iterdir()):
        m = _STAGING.match(entry.name)
        if not m or m["name"] != final.name or not entry.is_dir():
            continue
        if entry.name.startswith(f".{final.name}.old-") and not final.exists():
            os.replace(entry, final)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def sweep(parent: Path) -> list[Path]:
    """`remove_stale` for every destination in `parent` that no live run holds (a cache's clean-up)."""
    from .errors import DestinationBusy

    removed = []
    names = {m["name"] for e in Path(parent).iterdir() if (m := _STAGING.match(e.name))} if Path(parent).is_dir() else ()
    for name in sorted(names):
        try:
            with exclusive(Path(parent) / name):
                removed += remove_stale(Path(parent) / name)
        except DestinationBusy:  # held by a live run: its staging folder is in use
            continue
    return removed


def _write_failure(final: Path, error: OSError):
    """An OSError while writing `final`'s staging folder, as the one-line error a user should see."""
    from .errors import CompressError, ResourceError

    where = error.filename or final
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = shutil.disk_usage(final.parent).free if final.parent.exists() else 0
        return ResourceError(f"{where}: {error.strerror} while writing {final} ({free / 2**20:.0f} MiB free "
                             "there); nothing was written")
    return CompressError(f"{where}: cannot write ({error.strerror}); nothing was written to {final}")


@contextlib.contextmanager
def staged_dir(final: Path, overwrite: bool = False, inputs: tuple[Path, ...] = (),
               replaceable: Callable[[Path], bool] = is_output_folder, lock: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    The destination is locked for the whole block (`lock=False`: the caller holds `exclusive(final)`), and
    what a killed earlier run left beside it is cleaned up first. On any exception (or signal turned into
    one) the temporary folder is removed and `final` is left as it was; an OSError of writing (disk full,
    read-only) becomes a one-line error.
    """
    final = Path(final)
    check_destination(final, overwrite, inputs, replaceable)  # before taking the lock: refusals create nothing
    with exclusive(final) if lock else contextlib.nullcontext():
        remove_stale(final)
        check_destination(final, overwrite, inputs, replaceable)  # as it is now that no one else writes it
        with _staging(final) as tmp:
            yield tmp


@contextlib.contextmanager
def _staging(final: Path) -> Iterator[Path]:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        from .errors import CompressError

        raise CompressError(f"{final}: cannot create the output folder here ({e.strerror})") from None
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failure(final, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)  # put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Cast:
    """A tensor to be stored as another dtype, converted only while the writer writes it (a converted copy of
    every tensor would otherwise be alive for the whole file)."""

    def __init__(self, tensor, dtype):
        self.tensor, self.dtype, self.shape = tensor, dtype, tensor.shape

    def numel(self) -> int:
        return self.tensor.numel()

    def element_size(self) -> int:
        import torch

        return torch.empty((), dtype=self.dtype).element_size()

    def materialize(self):
        return self.tensor.to(self.dtype)


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, written to a temporary name one tensor at a time, then renamed.

    Tensors are laid out in name order after a header with sorted keys, so equal inputs give equal bytes;
    nothing but one tensor's bytes is held beyond the tensors themselves (safetensors' own writer builds
    the whole content in memory first: 4 GB for an 8B model's packed codes).
    """
    import struct

    import torch

    dtypes = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
    path = Path(path)
    names = sorted(tensors)
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in dtypes:
            raise ValueError(f"{path}: tensor '{name}' has dtype {t.dtype}, which this writer does not store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            t = tensors[name]
            t = (t.materialize() if isinstance(t, Cast) else t).detach().to("cpu").contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
