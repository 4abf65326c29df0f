"""Run a recipe: each stage, then the same evaluator and the stage's gate, then the output folder."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import atomic
from .errors import CompressError, GateFailure
from .evaluate.metrics import Metrics
from .footprint import GIB, available_memory, memory_estimate, stage_memory
from .manifest import write_outputs
from .recipe import Recipe
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

    @property
    def passed(self) -> bool | None:
        return None if self.gate is None else not self.failures


@dataclass
class RunRecord:
    recipe: Recipe
    stages: list[StageRecord] = field(default_factory=list)
    memory: dict | None = None

    @property
    def failed(self) -> StageRecord | None:
        return next((s for s in self.stages if s.failures), None)


def check_memory(name: str, estimate: dict, enforce: bool) -> None:
    """Refuse a stage whose estimated peak exceeds the memory available now (unless told not to)."""
    available = available_memory()
    if enforce and estimate["bytes"] > available:
        biggest = max(estimate["parts"], key=estimate["parts"].get)
        raise CompressError(
            f"stage '{name}' needs about {estimate['bytes'] / GIB:.1f} GiB (mostly {biggest}), "
            f"{available / GIB:.1f} GiB is available; use a machine with more memory or pass --no-memory-check"
        )


def run_recipe(recipe: Recipe, out: Path, overwrite: bool = False,
               on_stage: Callable[[StageRecord], None] = lambda r: None,
               on_start: Callable[[int, str, dict | None], None] = lambda i, n, e: None) -> RunRecord:
    """Run `recipe`, writing `out` atomically; raise GateFailure (after writing the record) if a gate fails.

    Before each stage after `load`, its peak memory is estimated, reported through `on_start` and
    checked against the memory available (recipe `memory_check`)."""
    torch.manual_seed(recipe.seed)
    record = RunRecord(recipe)
    state = None
    transformed = False
    with atomic.staged_dir(Path(out), overwrite=overwrite) as tmp:
        ctx = RunContext(recipe, out_dir=tmp)
        for index, (name, config) in enumerate(recipe.stage_list()):
            stage = STAGES[name]
            estimate = None
            if state is not None:
                estimate = stage_memory(state, stage.memory_multiple(config), recipe.data, stage.calibrates)
                on_start(index, name, estimate)
                check_memory(name, estimate, recipe.memory_check)
            start = time.perf_counter()
            outcome = stage.handler(config, state, ctx)
            state = outcome.state
            metrics = outcome.metrics or ctx.evaluator.measure(state, desc=f"evaluate {name}")
            gate = config.gate
            details = dict(outcome.details)
            if estimate is not None:
                details["memory_estimate_gib"] = round(estimate["bytes"] / GIB, 2)
            stage_record = StageRecord(
                index, name, config.model_dump(mode="json", exclude={"gate"}), details, metrics,
                gate.model_dump(mode="json") if gate else None, gate.failures(metrics) if gate else [],
                time.perf_counter() - start, outcome.artifacts,
            )
            record.stages.append(stage_record)
            on_stage(stage_record)
            transformed |= stage.transforms
            if stage_record.failures:
                break
        if not record.failed:
            record.memory = memory_estimate(state)
        write_outputs(record, state if transformed and not record.failed else None, tmp)
    if record.failed:
        s = record.failed
        raise GateFailure(f"gate failed after stage {s.index} '{s.name}': {'; '.join(s.failures)}")
    return record

