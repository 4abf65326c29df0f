"""Run a recipe: each stage, then the same evaluator and the stage's gate, then the output folder."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import atomic
from .errors import CompressError, GateFailure
from .evaluate.greedy import with_torch_agreement
from .evaluate.metrics import Metrics
from .footprint import GIB, check_disk, check_memory, disk_estimate, memory_estimate, stage_memory
from .handoff import write_handoff
from .manifest import write_outputs
from .recipe import Recipe
from .stage_cache import CachedRun
from .state import ModelState
from .stages import STAGES, RunContext


@dataclass
class StageRecord:
    index: int
    name: str
    settings: dict
    details: dict
    metrics: Metrics
    gate: dict | None
    failures: list[str]
    wall_s: float
    artifacts: list[dict] = field(default_factory=list)
    reused: bool = False  # taken from the stage cache, not run

    @property
    def passed(self) -> bool | None:
        return None if self.gate is None else not self.failures

    def cached(self) -> dict:
        """What the stage cache keeps of it (the gate is the reusing run's)."""
        return {"settings": self.settings, "details": self.details, "metrics": asdict(self.metrics),  # unrounded
                "wall_s": self.wall_s, "artifacts": self.artifacts}

    @classmethod
    def from_cache(cls, index: int, name: str, config, kept: dict) -> "StageRecord":
        metrics = Metrics(**kept["metrics"])
        gate = config.gate
        return cls(index, name, kept["settings"], kept["details"], metrics,
                   gate.model_dump(mode="json") if gate else None, gate.failures(metrics) if gate else [],
                   kept["wall_s"], kept["artifacts"], reused=True)


@dataclass
class RunRecord:
    recipe: Recipe
    stages: list[StageRecord] = field(default_factory=list)
    memory: dict | None = None

    @property
    def failed(self) -> StageRecord | None:
        return next((s for s in self.stages if s.failures), None)


class _Stop(Exception):
    """A gate failed: leave the staging folder (and so every artifact of the run) unwritten."""


def _input_folders(recipe: Recipe) -> tuple[Path, ...]:
    return tuple(Path(m) for m in (recipe.model, recipe.reference) if m and Path(m).is_dir())


def _run_stage(index: int, name: str, config, state, ctx: RunContext,
               on_start: Callable[[int, str, dict | None], None]) -> tuple[StageRecord, object]:
    """One stage: its memory (and, for an exporter, disk) checked first, then run, measured and gated."""
    recipe, stage = ctx.recipe, STAGES[name]
    estimate = None
    if state is not None:
        estimate = stage_memory(state, stage.memory_multiple(config), recipe.data, stage.calibrating(config), config,
                                stage.groups(config))
        on_start(index, name, estimate)
        whole = stage.layer_groups is not None and stage.groups(config) is None
        check_memory(name, estimate, recipe.memory_check,
                     "convert it a group of layers at a time (`chunks: N`, --chunks N), " if whole else "")
        if stage.exports:
            check_disk(name, disk_estimate(state, config), ctx.out_dir, recipe.memory_check)
    start = time.perf_counter()
    if stage.transforms:
        ctx.forget_smoke()
    outcome = stage.handler(config, state, ctx)
    metrics = outcome.metrics or ctx.evaluator.measure(outcome.state, desc=f"evaluate {name}")
    gate = config.gate
    details = dict(outcome.details)
    if estimate is not None:
        details["memory_estimate_gib"] = round(estimate["bytes"] / GIB, 2)
    if stage.exports and outcome.artifacts:  # what the hand-off's load snippets must reproduce
        ours = ctx.torch_smoke(outcome.state)
        details["smoke_test"] = with_torch_agreement(details.get("smoke_test", ours), ours["tokens"])
    record = StageRecord(
        index, name, config.model_dump(mode="json", exclude={"gate"}), details, metrics,
        gate.model_dump(mode="json") if gate else None, gate.failures(metrics) if gate else [],
        time.perf_counter() - start, outcome.artifacts,
    )
    return record, outcome.state


def run_recipe(recipe: Recipe, out: Path, overwrite: bool = False,
               on_stage: Callable[[StageRecord], None] = lambda r: None,
               on_start: Callable[[int, str, dict | None], None] = lambda i, n, e: None,
               on_note: Callable[[str], None] = lambda line: None) -> RunRecord:
    """Run `recipe`, writing `out` atomically; raise GateFailure if a gate fails.

    Before each stage after `load`, its peak memory is estimated, reported through `on_start` and
    checked against the memory available, and an exporter's output size against the free disk (recipe
    `memory_check`). A failed gate writes no artifact and leaves `out` as it was: the failed run's
    manifest and report go to `out` if it did not hold an earlier output, else beside it, to OUT.failed.
    """
    out = Path(out)
    torch.manual_seed(recipe.seed)
    record = RunRecord(recipe)
    state = cached = None
    transformed = False
    try:
        with atomic.staged_dir(out, overwrite=overwrite, inputs=_input_folders(recipe)) as tmp:
            ctx = RunContext(recipe, out_dir=tmp)
            stages = recipe.stage_list()
            for index, (name, config) in enumerate(stages):
                if index == 1:
                    cached = CachedRun.plan(recipe, state, ctx.reference, stages[1:])
                if cached and index <= cached.reusable:
                    stage_record = StageRecord.from_cache(index, name, config, cached.reused_record(index, tmp))
                    produced = cached.last_model(index) if index == cached.reusable else None
                    if produced:  # the model the last reused transforming stage made
                        state = ModelState.open(cached.cache.model_source(produced, state.source),
                                                **_open_options(stages[0][1], state))
                else:
                    stage_record, state = _run_stage(index, name, config, state, ctx, on_start)
                    if cached and not stage_record.failures:
                        cached.store(index, stage_record.cached(), state, tmp, STAGES[name].transforms)
                        for line in cached.cache.drain_notes():
                            on_note(line)
                record.stages.append(stage_record)
                on_stage(stage_record)
                transformed |= STAGES[name].transforms
                if stage_record.failures:
                    raise _Stop
            record.memory = memory_estimate(state)
            write_handoff(write_outputs(record, state if transformed else None, tmp), tmp)
            if cached:
                cached.finish()  # a passed run replaces the recipe's previous entries
                for line in cached.cache.drain_notes():
                    on_note(line)
    except _Stop:
        s = record.failed
        keep = out.is_dir() and any(out.iterdir())
        record_dir = out.with_name(out.name + ".failed") if keep else out
        try:
            with atomic.staged_dir(record_dir, overwrite=True) as tmp:
                write_handoff(write_outputs(record, None, tmp), tmp)
        except CompressError as e:  # e.g. OUT.failed is a folder of the user's: the record is not worth it
            kept = f"; {out} was left as it was; this run's record was not written ({e})"
            record_dir = None
        else:
            kept = f"; {out} was left as it was, this run's record is in {record_dir}" if keep else ""
        raise GateFailure(f"gate failed after stage {s.index} '{s.name}': {'; '.join(s.failures)}{kept}",
                          record_dir) from None
    return record


def _open_options(load_config, state) -> dict:
    """How the load stage opened the model, to reopen a cached stage's model the same way."""
    return dict(allow_pickle=load_config.allow_pickle, trust_remote_code=load_config.trust_remote_code,
                device=state.device, dtype=state.dtype)
