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

The cache has a size budget (MINICPM_COMPRESS_STAGE_CACHE_SIZE, e.g. `10GiB`, `500MB`; default 10 GiB): after a
store the least recently used entries go until it fits, and an entry larger than the whole budget is not
stored (one line says so). `minicpm-compress cache` shows it and `cache --clear` empties it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, atomic
from .cache import cache_dir
from .errors import CompressError, DestinationBusy
from .manifest_schema import CachedStage
from .sizes import parse_size
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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def checkpoint_files_key(folder: Path) -> str:
    """Every file of a checkpoint folder but its weights (those are in the model's fingerprint): tokenizer
    files, chat template, special tokens, generation and image-processor settings — all of which reach
    artifacts — and whatever else a checkpoint carries, by name and content."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            h.update(path.relative_to(folder).as_posix().encode() + b"\0")
            h.update(atomic.sha256_file(path).encode())
    return h.hexdigest()


def input_key(recipe, state, reference) -> str | None:
    """What every stage of the run starts from (the code, the model and its quantized weights, the
    checkpoint's other files, the reference's weights, data, seed, device, dtype); None when the model has
    no file source to refer to."""
    from .manifest import source_entry

    source = source_entry(state)
    if source is None:
        return None
    quantized = atomic.sha256_file(state.source.qweights) if state.source.qweights else None
    return _digest(code_fingerprint(), state.fingerprint(), quantized, checkpoint_files_key(state.source.checkpoint),
                   reference.fingerprint(), recipe.data.model_dump(mode="json"), recipe.seed, recipe.device,
                   recipe.dtype)


def stage_keys(first: str, stages: list[tuple[str, object]]) -> list[str]:
    """One key per stage after `load`, each chaining the ones before it."""
    keys, key = [], first
    for name, config in stages:
        key = _digest(key, name, config.model_dump(mode="json", exclude={"gate"}))
        keys.append(key)
    return keys


DEFAULT_BUDGET = 10 << 30
def budget() -> int:
    value = os.environ.get("MINICPM_COMPRESS_STAGE_CACHE_SIZE")
    try:
        return DEFAULT_BUDGET if value is None else parse_size(value)
    except ValueError as e:
        raise CompressError(f"MINICPM_COMPRESS_STAGE_CACHE_SIZE: {e}") from None


def cache_root() -> Path:
    where = _setting()
    root = Path(where) if where not in ("", "0", "1") else cache_dir("stages")
    root.mkdir(parents=True, exist_ok=True)
    return root


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def model_bytes(state) -> int:
    """What `write_model` will store of `state`: its quantized weights and changed float tensors (estimated
    from what is held, before writing anything)."""
    from .footprint import quantized_bytes
    from .quant.qweight import StoredQWeights

    q = state.qweights
    if isinstance(q, StoredQWeights) and q.unchanged:
        total = q.path.stat().st_size
    else:
        total = sum(quantized_bytes(w) for w in q.values())
    weights = state.weights
    total += sum(t.numel() * t.element_size() for t in getattr(weights, "overrides", {}).values())
    total += sum(s.numel() * s.element_size() for ops in getattr(weights, "ops", {}).values() for _, s in ops)
    return total


@dataclass
class StageCache:
    root: Path
    recipe_name: str
    budget: int = DEFAULT_BUDGET
    notes: list[str] = field(default_factory=list)  # lines for the user (an entry not stored, entries evicted)

    @classmethod
    def open(cls, recipe) -> "StageCache":
        root = cache_root()
        atomic.sweep(root)  # staging folders of runs that were killed while storing
        return cls(root, recipe.name, budget())

    def entries(self) -> list[Path]:
        """Complete entries, least recently used first."""
        found = [p for p in self.root.iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{32}", p.name)]
        return sorted(found, key=lambda p: (self.last_used(p), p.name))

    @staticmethod
    def last_used(entry: Path) -> float:
        try:
            return (entry / RECORD_NAME).stat().st_mtime
        except OSError:
            return 0.0

    @staticmethod
    def read_record(entry: Path) -> dict:
        try:
            record = json.loads((entry / RECORD_NAME).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def clear(self) -> int:
        """Delete every entry no live run is writing, and the run indexes; returns the bytes freed."""
        freed = 0
        atomic.sweep(self.root)
        for entry in self.entries():
            try:
                with atomic.exclusive(entry):
                    size = folder_bytes(entry)
                    shutil.rmtree(entry)
                    freed += size
            except DestinationBusy:
                continue
        shutil.rmtree(self.root / "runs", ignore_errors=True)
        return freed

    def touch(self, key: str) -> None:
        """Mark an entry used now (the eviction order)."""
        with contextlib.suppress(OSError):
            os.utime(self.entry(key) / RECORD_NAME)

    def evict(self, keep: set[str]) -> None:
        """Delete least recently used entries (never those in `keep`) until the cache fits its budget."""
        entries = self.entries()
        sizes = {p: folder_bytes(p) for p in entries}
        total = sum(sizes.values())
        for p in entries:
            if total <= self.budget:
                break
            if p.name in keep:
                continue
            shutil.rmtree(p, ignore_errors=True)
            total -= sizes[p]
            self.notes.append(f"stage cache: evicted {p.name} ({sizes[p] / 2**20:.0f} MiB, least recently used) to "
                              f"stay within {self.budget / 2**30:.1f} GiB")

    def entry(self, key: str) -> Path:
        return self.root / key[:32]

    def valid(self, key: str) -> bool:
        """The entry is complete and its files are as stored (a damaged one is removed)."""
        folder = self.entry(key)
        try:
            record = self.record(key)
            CachedStage.model_validate(record)
            ok = all(atomic.sha256_file(folder / FILES_DIR / a["path"]) == a["sha256"] for a in record["artifacts"])
            ok = ok and (not record["transforms"] or (folder / MODEL_DIR / CONFIG_NAME).is_file())
        except (OSError, ValueError, KeyError, TypeError):  # a pydantic ValidationError is a ValueError
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

    def store(self, key: str, record: dict, state, out_dir: Path, artifacts: list[dict], transforms: bool,
              in_use: tuple[str, ...] = ()) -> None:
        """Keep a passed stage: its record, the model it produced and copies of its files (not links: an
        output file changed in place, as metadata editors do, must not change the cache or other outputs)."""
        from .manifest import write_model

        final = self.entry(key)
        if final.exists():
            return
        size = sum((out_dir / a["path"]).stat().st_size for a in artifacts) + (model_bytes(state) if transforms else 0)
        if size > self.budget:
            self.notes.append(f"stage cache: not storing this stage ({size / 2**30:.2f} GiB is more than the cache's "
                              f"budget of {self.budget / 2**30:.2f} GiB; set MINICPM_COMPRESS_STAGE_CACHE_SIZE)")
            return
        try:
            with atomic.staged_dir(final, overwrite=True, replaceable=atomic.own_cache) as tmp:
                if transforms:
                    (tmp / MODEL_DIR).mkdir()
                    write_model(state, tmp / MODEL_DIR)
                for a in artifacts:
                    target = tmp / FILES_DIR / a["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(out_dir / a["path"], target)
                atomic.write_text(tmp / RECORD_NAME, json.dumps({**record, "transforms": transforms}, indent=1))
        except DestinationBusy:  # another run is storing the same stage now
            return
        self.evict(keep={final.name, *(self.entry(k).name for k in in_use)})  # a run's own entries hold its model

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
        previous = _entry_names(index)
        atomic.write_text(index, json.dumps([self.entry(k).name for k in used]))
        listed = {name for other in runs.glob("*.json") for name in _entry_names(other)}
        for name in previous:
            if name not in listed:
                shutil.rmtree(self.root / name, ignore_errors=True)

    def drain_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes


def _entry_names(index: Path) -> list[str]:
    """The entry names a run index lists (a damaged index lists none; only entry-shaped names count, so
    nothing outside the cache is ever deleted by what a file there says)."""
    try:
        names = json.loads(index.read_text())
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str) and re.fullmatch(r"[0-9a-f]{32}", n)] if isinstance(names, list) else []


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
        self.cache.touch(key)
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
        self.cache.store(key, record, state, out_dir, record["artifacts"], transforms, tuple(self.used))
        if self.cache.entry(key).exists():
            self.used.append(key)

    def finish(self) -> None:
        self.cache.keep_only(self.used)
