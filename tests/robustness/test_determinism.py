"""Same recipe, same seed, same inputs: byte-identical output folders, across separate processes, for a
recipe that runs every stage and every exporter."""

import hashlib
import json
import os
import subprocess
import sys

from .conftest import write_recipe

EVERY_STAGE = {
    "prune-awq-gptq-exports": (
        "  - prune: {ratio: 0.2}\n"
        "  - heal: {steps: 2, samples: 4, sequence_length: 64}\n"
        "  - awq: {bits: 4, group_size: 32}\n"
        "  - gptq: {bits: 4, group_size: 32}\n"
        "  - evaluate: {}\n"
        "  - gguf: {type: Q4_0}\n"
        "  - onnx: {bits: 4, accuracy_level: 4}\n"  # auto would choose by timing this machine
        "  - coreml: {bits: 4, block_size: 32, context: 64}\n"
        "  - hf_awq: {}\n"
    ),
    "rtn-qat": (
        "  - rtn: {bits: 4, group_size: 32, symmetric: true}\n"
        "  - qat: {bits: 4, group_size: 32, symmetric: true, steps: 3, samples: 4, sequence_length: 64}\n"
    ),
}
# what a manifest may differ in from run to run: how long things took (every other byte must match)
VOLATILE = {"wall_s", "tokens_per_s"}


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _fingerprint(folder):
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name == "manifest.json":
            files[name] = _stable(json.loads(path.read_text()))
        elif name != "report.md":  # the manifest, for people, with timings
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def test_every_stage_and_exporter_is_byte_identical_across_processes(tmp_path, checkpoint):
    for name, stages in EVERY_STAGE.items():
        recipe = write_recipe(tmp_path, checkpoint, stages, name=name)
        runs = []
        for attempt in ("a", "b"):
            out = tmp_path / f"{name}-{attempt}"
            result = subprocess.run([sys.executable, "-c", "from minicpm_compress.cli import main; main()", "run",
                                     str(recipe), "--out", str(out)], capture_output=True, text=True, env=os.environ.copy())
            assert result.returncode == 0, result.stderr[-3000:]
            runs.append(_fingerprint(out))
        first, second = runs
        assert sorted(first) == sorted(second)
        for file in first:
            assert first[file] == second[file], f"{name}: {file} differs between two identical runs"
        stages = [s["name"] for s in first["manifest.json"]["stages"]]
        assert len(stages) == len(set(stages)) or name == "rtn-qat"
        assert any(f.endswith(".gguf") for f in first) or name == "rtn-qat"
