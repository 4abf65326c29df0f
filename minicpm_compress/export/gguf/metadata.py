"""Read one metadata value of a GGUF file without parsing the rest.

gguf-py's GGUFReader builds a numpy view of every part of every field: on a file with Qwen2's 151,936
tokens and as many merges that takes tens of seconds. Here the key/value section is walked with struct,
array elements skipped by their sizes, and the walk stops at the key asked for.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

# GGUF value types (gguf-py's GGUFValueType): 0–7 and 10–12 numbers, 8 string, 9 array
_NUMBERS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_value(path: Path, key: str):
    """The value stored under `key` (numbers, bools and strings; arrays as lists), or None if absent."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, version, _tensors, count = struct.unpack_from("<4sIQQ", data, 0)
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path}: not a GGUF file of version 2 or later")
        offset = 24
        for _ in range(count):
            name, offset = _string(data, offset)
            (kind,), offset = struct.unpack_from("<I", data, offset), offset + 4
            if name == key:
                return _value(data, offset, kind)[0]
            offset = _skip(data, offset, kind)
    return None


def _string(data, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, offset)
    start = offset + 8
    return bytes(data[start:start + length]).decode("utf-8"), start + length


def _value(data, offset: int, kind: int):
    if kind in _NUMBERS:
        fmt = "<" + _NUMBERS[kind]
        return struct.unpack_from(fmt, data, offset)[0], offset + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(data, offset)
    if kind == _ARRAY:
        item, length = struct.unpack_from("<IQ", data, offset)
        offset += 12
        values = []
        for _ in range(length):
            value, offset = _value(data, offset, item)
            values.append(value)
        return values, offset
    raise ValueError(f"unknown GGUF value type {kind}")


def _skip(data, offset: int, kind: int) -> int:
    if kind in _NUMBERS:
        return offset + struct.calcsize("<" + _NUMBERS[kind])
    if kind == _STRING:
        return offset + 8 + struct.unpack_from("<Q", data, offset)[0]
    if kind == _ARRAY:
        item, length = struct.unpack_from("<IQ", data, offset)
        offset += 12
        if item in _NUMBERS:
            return offset + length * struct.calcsize("<" + _NUMBERS[item])
        for _ in range(length):
            offset = _skip(data, offset, item)
        return offset
    raise ValueError(f"unknown GGUF value type {kind}")
