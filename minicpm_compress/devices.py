"""The compute device and dtype every stage materialises layers on (`--device`, `--dtype`)."""

from __future__ import annotations

import torch

from .errors import CompressError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_threads() -> int:
    """The CPU threads the runtimes that verify an artifact (llama.cpp, onnxruntime) compute on: as many as torch
    uses (its default: the physical cores), so that a process limited to fewer threads (torch.set_num_threads,
    OMP_NUM_THREADS; the test suite's xdist workers) does not run busy-waiting runtime threads past its share."""
    return max(1, torch.get_num_threads())


def compute_device(device: str = "auto", dtype: str = "float32") -> tuple[str, torch.dtype]:
    """`auto` picks CUDA when present, then Apple's MPS, then the CPU; a named device must exist."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CompressError("--device mps: Apple's MPS backend is not available here")
    if dtype not in DTYPES:
        raise CompressError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    return device, DTYPES[dtype]
