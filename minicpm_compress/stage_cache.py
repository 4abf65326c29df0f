"""Stage results kept between runs, keyed by what produced them: rerunning a recipe whose last stages
changed reruns only those.

A stage's key chains the run's inputs (the package's source code, the loaded model's fingerprint and
quantized weights, the reference's fingerprint, data, seed, device, dtype) with every stage's name and settings up to it; gates are
not in the key (a cached stage's metrics are checked against the gate of the run that reuses it). An
entry holds the stage's record, the model it produced (the same files an output folder holds: config,
quantized and changed float tensors) when it transforms the model, and an exporter's files. Only stages
that passed are stored. When a run passes, the entries of the recipe's previous run that it did not use are deleted,
so the cache holds about one run per recipe name (`$MINICPM_COMPRESS_CACHE/stages`, or the folder
MINICPM_COMPRESS_STAGE_CACHE names; `cache: false` in a recipe, `--no-cache` or MINICPM_COMPRESS_STAGE_CACHE=0
turn it off).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import __version__, atomic
from .cache import cache_dir
from .models.source import CONFIG_NAME, MODIFIED_NAME, QWEIGHTS_NAME, ModelSource

RECORD_NAME = "record.json"
MODEL_DIR = "model"
FILES_DIR = "files"


def _setting() -> str:
    return os.environ.get("MINICPM_COMPRESS_STAGE_CACHE", "1")


def enabled(recipe) -> bool:
    return recipe.cache and _setting() != "0"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """The package's own source: results made by other code are not reused (an edited checkout included)."""
    h = hashlib.sha256(__version__.encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.relative_to(Path(__file__).parent).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def input_key(recipe, state, reference) -> str | None:
    """What every stage of the run starts from (the code, the model and its quantized weights, the
    reference's weights, data, seed, device, dtype); None when the model has no file source to refer to."""
    from .manifest import source_entry

    source = source_entry(state)
    if source is None:
        return None
    quantized = atomic.sha256_file(state.source.qweights) if state.source.qweights else None
    return _digest(code_fingerprint(), state.fingerprint(), quantized, reference.fingerprint(),
                   recipe.data.model_dump(mode="json"), recipe.seed, recipe.device, recipe.dtype)


def stage_keys(first: str, stages: list[tuple[str, object]]) -> list[str]:
    """One key per stage after `load`, each chaining the ones before it."""
    keys, key = [], first
    for name, config in stages:
        key = _digest(key, name, config.model_dump(mode="json", exclude={"gate"}))
        keys.append(key)
    return keys


@dataclass
class StageCache:
    root: Path
    recipe_name: str

    @classmethod
    def open(cls, recipe) -> "StageCache":
        where = _setting()
        root = Path(where) if where not in ("", "1") else cache_dir("stages")
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, recipe.name)

    def entry(self, key: str) -> Path:
        return self.root / key[:32]

    def valid(self, key: str) -> bool:
        """The entry is complete and its files are as stored (a damaged one is removed)."""
        folder = self.entry(key)
        try:
            record = self.record(key)
            ok = all(atomic.sha256_file(folder / FILES_DIR / a["path"]) == a["sha256"] for a in record["artifacts"])
            ok = ok and (not record["transforms"] or (folder / MODEL_DIR / CONFIG_NAME).is_file())
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            shutil.rmtree(folder, ignore_errors=True)
        return ok

    def record(self, key: str) -> dict:
        return json.loads((self.entry(key) / RECORD_NAME).read_text())

    def model_source(self, key: str, loaded: ModelSource) -> ModelSource:
        """The model a cached transforming stage produced, as a source on the run's own checkpoint."""
        folder = self.entry(key) / MODEL_DIR
        qweights, modified = folder / QWEIGHTS_NAME, folder / MODIFIED_NAME
        return ModelSource(loaded.spec, loaded.checkpoint, loaded.reference,
                           qweights if qweights.is_file() else None, modified if modified.is_file() else None,
                           folder / CONFIG_NAME, loaded.weights_sha256)

    def store(self, key: str, record: dict, state, out_dir: Path, artifacts: list[dict], transforms: bool) -> None:
        """Keep a passed stage: its record, the model it produced and copies of its files (not links: an
        output file changed in place, as metadata editors do, must not change the cache or other outputs)."""
        from .manifest import write_model

        final = self.entry(key)
        if final.exists():
            return
        with atomic.staged_dir(final, overwrite=True) as tmp:
            if transforms:
                (tmp / MODEL_DIR).mkdir()
                write_model(state, tmp / MODEL_DIR)
            for a in artifacts:
                target = tmp / FILES_DIR / a["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out_dir / a["path"], target)
            atomic.write_text(tmp / RECORD_NAME, json.dumps({**record, "transforms": transforms}, indent=1))

    def restore_files(self, key: str, artifacts: list[dict], out_dir: Path) -> None:
        for a in artifacts:
            target = out_dir / a["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.entry(key) / FILES_DIR / a["path"], target)

    def keep_only(self, used: list[str]) -> None:
        """Record this recipe's entries; delete those its previous run made that no run listed now uses."""
        runs = self.root / "runs"
        runs.mkdir(exist_ok=True)
        index = runs / f"{_digest(self.recipe_name)[:16]}.json"
        previous = json.loads(index.read_text()) if index.is_file() else []
        atomic.write_text(index, json.dumps([self.entry(k).name for k in used]))
        listed = {name for other in runs.glob("*.json") for name in json.loads(other.read_text())}
        for name in previous:
            if name not in listed:
                shutil.rmtree(self.root / name, ignore_errors=True)


@dataclass
class CachedRun:
    """One run's use of the cache: which leading stages it reuses, and what it stores."""

    cache: StageCache
    keys: list[str]  # per stage after load
    reusable: int  # stages 1..reusable come from the cache
    used: list[str]

    @classmethod
    def plan(cls, recipe, state, reference, stages: list[tuple[str, object]]) -> "CachedRun | None":
        first = input_key(recipe, state, reference) if enabled(recipe) else None
        if first is None:
            return None
        cache = StageCache.open(recipe)
        keys = stage_keys(first, stages)
        reusable = 0
        for key in keys:
            if not cache.valid(key):
                break
            reusable += 1
        return cls(cache, keys, reusable, [])

    def reused_record(self, index: int, out_dir: Path) -> dict:
        """Stage `index`'s cached record, its files put back into `out_dir`."""
        key = self.keys[index - 1]
        record = self.cache.record(key)
        self.cache.restore_files(key, record["artifacts"], out_dir)
        self.used.append(key)
        return record

    def last_model(self, upto: int) -> str | None:
        """The key of the last transforming stage among the reused ones up to `upto`, if any."""
        for index in range(upto, 0, -1):
            if self.cache.record(self.keys[index - 1])["transforms"]:
                return self.keys[index - 1]
        return None

    def store(self, index: int, record: dict, state, out_dir: Path, transforms: bool) -> None:
        key = self.keys[index - 1]
        self.cache.store(key, record, state, out_dir, record["artifacts"], transforms)
        self.used.append(key)

    def finish(self) -> None:
        self.cache.keep_only(self.used)
