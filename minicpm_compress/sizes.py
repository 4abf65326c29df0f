"""Sizes as people write them: '90MiB', '94.5 MB', '10GiB' or a number of bytes."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'90MiB', '94.5 MB', '1.2GiB' or a number of bytes → bytes; ValueError otherwise."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"size '{text}' is not a number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
