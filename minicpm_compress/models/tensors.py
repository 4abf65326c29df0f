"""Tensor sources: where a model's weights come from, read one tensor at a time.

`CheckpointTensors` opens a checkpoint folder's safetensors files (single or sharded) by reading only
their headers; a tensor's bytes are read from disk when it is asked for, in the checkpoint's own dtype
(bf16 stays bf16), with plain reads rather than a memory map, so a process that has streamed a 16 GB
checkpoint through holds only what it kept. `MemoryTensors` wraps tensors already in memory (a model
built in a test, a small model). Both answer the same questions: names, shapes, dtypes, one tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ..errors import CompressError

WEIGHTS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class MemoryTensors:
    """Tensors already in memory (shared, not copied)."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str = "in-memory model"):
        self.tensors = tensors
        self.label = label

    def names(self) -> list[str]:
        return sorted(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach()

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in self.names():
            t = self.tensors[name].detach().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
        return h.hexdigest()


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > size - 8 or length > 100_000_000:
                    raise ValueError("header length beyond the end of the file")
                raw = f.read(length)
            try:
                header = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"header is not valid JSON: {e}") from None
        except (struct.error, ValueError) as e:
            raise CompressError(f"{path}: unreadable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise CompressError(f"{path}: unreadable safetensors file (header is not an object)")
        self.data_start = 8 + length
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CompressError(f"{path}: tensor '{name}' has an unreadable entry in the header "
                                    f"(dtype {info.get('dtype') if isinstance(info, dict) else info!r})") from None
            numel = 1
            for d in shape:
                numel *= d
            if end - start != numel * dtype.itemsize or end < start:
                raise CompressError(f"{path}: tensor '{name}' has {end - start} bytes for shape {shape} {info['dtype']}")
            if self.data_start + end > size:
                raise CompressError(f"{path}: truncated (tensor '{name}' ends past the end of the file)")
            self.entries[name] = (dtype, shape, start, end)

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, start, end = self.entries[name]
        buffer = bytearray(end - start)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + start)
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                n = f.readinto(view[done:])
                if not n:
                    raise CompressError(f"{self.path}: truncated while reading tensor '{name}'")
                done += n
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


class CheckpointTensors:
    """The tensors of a checkpoint folder, read lazily from its safetensors (or, if allowed, pickle) files."""

    def __init__(self, folder: Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.label = str(self.folder)
        self.files = _weight_files(self.folder, allow_pickle)
        self._where: dict[str, object] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        for path in self.files:
            if path.suffix == ".safetensors":
                f = _SafetensorsFile(path)
                for name in f.entries:
                    self._where[name] = f
            else:
                for name, t in self._pickle(path).items():
                    self._where[name] = path

    def _pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._pickles:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is bad input, never run code
                reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                if "weights_only" in reason or "Unsupported" in reason or "global" in reason.lower():
                    reason = "it holds objects other than tensors, which are never unpickled"
                raise CompressError(f"{path}: cannot read pickle weights safely ({reason})") from None
            if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                raise CompressError(f"{path}: pickle weights are not a name → tensor mapping")
            self._pickles[path] = loaded
        return self._pickles[path]

    def names(self) -> list[str]:
        return sorted(self._where)

    def _entry(self, name: str):
        try:
            return self._where[name]
        except KeyError:
            raise CompressError(f"{self.folder}: missing tensor '{name}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        where = self._entry(name)
        return where.entries[name][1] if isinstance(where, _SafetensorsFile) else tuple(self._pickle(where)[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        where = self._entry(name)
        return where.entries[name][0] if isinstance(where, _SafetensorsFile) else self._pickle(where)[name].dtype

    def get(self, name: str) -> torch.Tensor:
        where = self._entry(name)
        t = where.read(name) if isinstance(where, _SafetensorsFile) else self._pickle(where)[name].clone()
        if t.dtype in FLOAT_DTYPES and not bool(torch.isfinite(t).all()):
            file = where.path if isinstance(where, _SafetensorsFile) else where
            raise CompressError(f"{file}: tensor '{name}' contains NaN or Inf values")
        return t

    def fingerprint(self) -> str:
        return weights_sha256(self.folder, self.files)


def _outside(name: str) -> bool:
    """A shard name that leaves its folder: absolute, a drive, or climbing with '..'."""
    return (name.startswith(("/", "\\")) or PureWindowsPath(name).drive != ""
            or ".." in PurePosixPath(name.replace("\\", "/")).parts)


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of a checkpoint folder, single-file or sharded (via its index.json)."""
    for index_name, is_pickle in ((SAFETENSORS_INDEX, False), (PICKLE_INDEX, True)):
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                shards = list(weight_map.values())
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise CompressError(f"{index_path}: not a valid shard index (needs a 'weight_map' object)") from None
            for shard in shards:
                if not isinstance(shard, str) or not shard:
                    raise CompressError(f"{index_path}: shard {shard!r} is not a file name")
            shards = sorted(set(shards))
            for shard in shards:
                if _outside(shard):  # by name: a symlink inside the folder (Hugging Face's cache) is fine
                    raise CompressError(f"{index_path}: shard '{shard}' lies outside the checkpoint folder; a "
                                        "checkpoint's weights must be inside it (move the file in and name it plainly)")
                if not (folder / shard).is_file():
                    raise CompressError(f"{index_path}: shard '{shard}' listed but missing")
            if is_pickle:
                _refuse_pickle(folder / shards[0], allow_pickle)
            return [folder / s for s in shards]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    if (folder / PICKLE_NAME).is_file():
        _refuse_pickle(folder / PICKLE_NAME, allow_pickle)
        return [folder / PICKLE_NAME]
    raise CompressError(f"{folder}: no weights found (expected {WEIGHTS_NAME} or a sharded index)")


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise CompressError(
            f"{path}: pickle weights are refused by default (they can run code); convert to safetensors "
            "or pass --allow-pickle"
        )


def weights_sha256(folder: Path, files: list[Path]) -> str:
    """sha256 over a checkpoint's weight files (in name order), remembered per (path, size, mtime)."""
    from ..cache import cache_dir

    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:40]
    memo = cache_dir("sha256") / key
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    digest = h.hexdigest()
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_text(digest + "\n")
    os.replace(tmp, memo)
    return digest


class PrefixedTensors:
    """The tensors of `base` whose names start with one of `prefixes`, named without `strip` (a view: the
    LLM of a MiniCPM-V checkpoint is its `llm.*` tensors named as a plain LLM's)."""

    def __init__(self, base, prefixes: tuple[str, ...], strip: str = ""):
        self.base = base
        self.strip = strip
        self.label = getattr(base, "label", "")
        self._names = {n.removeprefix(strip): n for n in base.names() if n.startswith(prefixes)}

    def names(self) -> list[str]:
        return sorted(self._names)

    def _full(self, name: str) -> str:
        return self._names.get(name, self.strip + name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(self._full(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(self._full(name))

    def get(self, name: str) -> torch.Tensor:
        return self.base.get(self._full(name))

    def fingerprint(self) -> str:
        return self.base.fingerprint()
