"""Write files and folders so that readers see either nothing or the complete result."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


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


def check_destination(final: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, an output folder that could not be written or would destroy something.

    Refused: a regular file; the current folder or one above it; a folder holding (or inside) one of the
    `inputs`; an existing non-empty folder without `overwrite`."""
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
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise CompressError(f"{final}: output folder exists and is not empty (pass --overwrite to replace it)")


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
def staged_dir(final: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    On any exception (or signal turned into one) the temporary folder is removed and `final` is left as it
    was; an OSError of writing (disk full, read-only) becomes a one-line error.
    """
    final = Path(final)
    check_destination(final, overwrite, inputs)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
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
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
