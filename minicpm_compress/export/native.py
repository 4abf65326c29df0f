"""What native libraries (llama.cpp, its mtmd and clip) print: collected, not shown, kept for error messages."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def native_log():
    """Collect what native code writes to stderr meanwhile (mtmd and clip log every tensor and image there);
    yields a list that receives the collected lines."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += sink.read().decode(errors="replace").splitlines()
