"""Progress bars for long work: shown on a terminal, silent in logs (MINICPM_COMPRESS_PROGRESS=0/1 forces)."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it"):
    forced = os.environ.get("MINICPM_COMPRESS_PROGRESS")
    disable = (forced == "0") if forced in ("0", "1") else not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=False, dynamic_ncols=True)
