"""The stage registry: a typed config plus the handler that applies it, found by name.

A stage module defines a `StageConfig` subclass and registers its handler:

    @register_stage("rtn", RTNConfig, "round-to-nearest weight quantization")
    def apply_rtn(config: RTNConfig, state: ModelState, ctx: RunContext) -> StageOutcome: ...

The pipeline measures every stage's resulting state with the recipe's evaluator (unless the handler
returns its own metrics) and checks the stage's gate. This module imports no stage: the built-in ones are
imported by `minicpm_compress.stages` (the catalog), which is what recipes and the pipeline read.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict

from .evaluate.gate import Gate

if TYPE_CHECKING:
    from pathlib import Path

    from .evaluate.evaluator import Evaluator
    from .evaluate.metrics import Metrics
    from .recipe import Recipe
    from .state import ModelState


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gate: Gate | None = None


@dataclass
class RunContext:
    recipe: "Recipe"
    out_dir: "Path | None" = None  # the (staging) output folder exporters write their artifacts into
    evaluator: "Evaluator | None" = None  # set by the load stage
    reference: "ModelState | None" = None  # the full-precision reference's state (set by the load stage)
    reference_model: Any = None  # its whole float model, once a stage needed one (qat, heal)
    _smoke: tuple | None = field(default=None, repr=False)  # (weak reference to a state, its torch smoke test)

    def torch_smoke(self, state: "ModelState") -> dict:
        """The smoke test of `state` as the gated model in torch: computed once per model state, so that
        exporters of the same model (a recipe's gguf, onnx and coreml stages) share it (on an 8B model
        streamed layer by layer it is one full pass per token). The pipeline calls `forget_smoke` before a
        stage that may change the state in place."""
        if self._smoke is None or self._smoke[0]() is not state:
            from .evaluate.greedy import smoke_test
            from .evaluate.runners import StreamedRunner

            self._smoke = (weakref.ref(state), smoke_test(state.tokenizer, StreamedRunner(state),
                                                          "the gated model in torch"))
        return self._smoke[1]

    def forget_smoke(self) -> None:
        self._smoke = None

    def teacher(self):
        """The reference as a whole float model (materialised on first use: training stages need it)."""
        if self.reference_model is None:
            self.reference_model = self.reference.model
        return self.reference_model

    def calibration(self, state: "ModelState", n_samples: int | None = None, length: int | None = None,
                    images: bool = True):
        """[n, length] calibration token ids from the recipe's calibration text (its defaults if not given); for
        a MiniCPM-V model (unless `images` is False), image prompts: each row a calibration image, then text."""
        from .data.textsets import calibration_samples

        data = self.recipe.data
        samples = calibration_samples(state.tokenizer, data.calibration_sources(), n_samples or data.calibration_samples,
                                      length or data.sequence_length, self.recipe.seed)
        if images and state.vision is not None:
            from .data.images import read_images
            from .data.prompts import image_prompts

            samples = image_prompts(state.tokenizer, state.vision.settings, read_images(data.calibration_images), samples)
        return samples


@dataclass
class StageOutcome:
    state: "ModelState"
    metrics: "Metrics | None" = None  # None: the pipeline measures `state` with the recipe's evaluator
    details: dict = field(default_factory=dict)  # what the stage did, for the manifest and report
    artifacts: list[dict] = field(default_factory=list)  # files written into the output folder (manifest entries)


@dataclass(frozen=True)
class StageType:
    name: str
    config_class: type[StageConfig]
    handler: Callable[..., StageOutcome]
    summary: str
    transforms: bool  # changes the model (its output folder then holds a new checkpoint)
    # None: streamed, one decoder layer in memory at a time; a number: the stage needs the whole float32
    # model in memory, about this many times over (training state, a traced graph, …); or a function of
    # the stage's config giving either
    whole_model: float | Callable[[StageConfig], float | None] | None = None
    # runs calibration samples through the layers (memory for their activations); or a function of the config
    calibrates: bool | Callable[[StageConfig], bool] = False
    exports: bool = False  # writes an artifact for a runtime (free disk is checked before it starts)
    # converts the model a group of consecutive decoder layers at a time, apart from its measurement (Core
    # ML in chunks): a function of the config giving the number of groups, or None
    layer_groups: Callable[[StageConfig], int | None] | None = None

    def memory_multiple(self, config: StageConfig) -> float | None:
        return self.whole_model(config) if callable(self.whole_model) else self.whole_model

    def calibrating(self, config: StageConfig) -> bool:
        return self.calibrates(config) if callable(self.calibrates) else self.calibrates

    def groups(self, config: StageConfig) -> int | None:
        return self.layer_groups(config) if self.layer_groups else None


STAGES: dict[str, StageType] = {}


def register_stage(name: str, config_class: type[StageConfig], summary: str, transforms: bool = True,
                   whole_model: float | Callable[[StageConfig], float | None] | None = None,
                   calibrates: bool | Callable[[StageConfig], bool] = False, exports: bool = False,
                   layer_groups: Callable[[StageConfig], int | None] | None = None):
    def decorate(handler):
        if name in STAGES:
            raise RuntimeError(f"stage '{name}' registered twice")
        STAGES[name] = StageType(name, config_class, handler, summary, transforms, whole_model, calibrates, exports,
                                 layer_groups)
        return handler

    return decorate
