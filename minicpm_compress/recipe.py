"""Recipes: the typed, strict description of a run, loaded from YAML or built by the CLI.

    name: demo
    model: minicpm-smollm2          # built-in name, checkpoint folder, or an output folder
    seed: 0
    data: {eval_tokens: 32768}
    stages:
      - rtn: {bits: 4, group_size: 128, gate: {max_ppl_increase: 0.5}}

Unknown keys, wrong types and missing files are errors that name the file, line and key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .data.images import ImageSource
from .data.textsets import TextSource
from .errors import CompressError
from .builtin import BUILTIN_MODELS
from .stages import STAGES, StageConfig


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class WeightedSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: TextSource
    weight: float = Field(1.0, gt=0)


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    calibration: list[WeightedSource] = Field(
        default_factory=lambda: [WeightedSource(source="austen-calib", weight=3), WeightedSource(source="zh-calib")]
    )
    calibration_samples: int = Field(128, ge=1)
    sequence_length: int = Field(512, ge=16)
    evaluation: list[TextSource] = Field(default_factory=lambda: ["austen-heldout"], min_length=1)
    eval_tokens: int = Field(32768, ge=16)
    eval_window: int = Field(512, ge=16)
    eval_batch_size: int = Field(4, ge=1)
    # MiniCPM-V models only: each calibration sample and evaluation window starts with one of these images
    calibration_images: ImageSource = "skimage-calib"
    evaluation_images: ImageSource = "skimage-heldout"

    @field_validator("calibration", mode="before")
    @classmethod
    def _plain_names(cls, value):
        if isinstance(value, list):
            return [{"source": v} if isinstance(v, str) else v for v in value]
        return value

    def calibration_sources(self) -> list[tuple[str, float]]:
        return [(s.source, s.weight) for s in self.calibration]


# One optional field per registered stage; a recipe's stage item sets exactly one of them.
_StageItem = create_model(
    "StageItem",
    __config__=ConfigDict(extra="forbid"),
    **{name: (stage.config_class | None, None) for name, stage in STAGES.items()},
)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "recipe"
    description: str = ""
    model: str
    reference: str | None = Field(None, description="full-precision reference; default: the model's own origin")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="compute device (auto: CUDA, then MPS, then CPU)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype of materialised layers")
    memory_check: bool = Field(True, description="refuse a stage whose memory estimate exceeds available RAM")
    cache: bool = Field(True, description="reuse the results of leading stages whose inputs and settings are unchanged")
    data: DataConfig = Field(default_factory=DataConfig)
    stages: list[_StageItem] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name_is_a_label(cls, value: str):
        # the default output folder is out/NAME and the stage cache files runs under it: a path here could
        # reach outside out/ or name out/ itself
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(f"a recipe's name is a label (the default output folder is out/NAME): 1 to 64 letters, "
                             f"digits, '.', '_' or '-', starting with a letter or digit, got {value!r}")
        return value

    @field_validator("model", "reference")
    @classmethod
    def _model_exists(cls, value: str | None):
        if value is not None and value not in BUILTIN_MODELS and not Path(value).is_dir():
            raise ValueError(f"'{value}' is not a built-in model ({', '.join(BUILTIN_MODELS)}) nor an existing folder")
        return value

    @field_validator("stages", mode="before")
    @classmethod
    def _one_stage_per_item(cls, value):
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and len(item) != 1:
                    raise ValueError(f"each stage is a mapping with exactly one key, the stage name ({', '.join(STAGES)})")
            # `- rtn` (no settings) means the stage with its defaults
            return [{item: {}} if isinstance(item, str) else {k: ({} if v is None else v) for k, v in item.items()}
                    if isinstance(item, dict) else item for item in value]
        return value

    @model_validator(mode="after")
    def _load_first(self):
        if self.stage_list()[0][0] != "load":
            self.stages.insert(0, _StageItem(load=STAGES["load"].config_class()))
        return self

    def stage_list(self) -> list[tuple[str, StageConfig]]:
        out = []
        for item in self.stages:
            (name, config), = ((k, v) for k, v in item if v is not None)
            out.append((name, config))
        return out

    def resolved(self) -> dict[str, Any]:
        """Every setting, defaults included, as written to the manifest."""
        data = self.model_dump(mode="json")
        data["stages"] = [{name: config.model_dump(mode="json")} for name, config in self.stage_list()]
        return data


# ---------------------------------------------------------------- YAML with line numbers


class _Loader(yaml.SafeLoader):
    pass


MAX_RECIPE_NODES = 100_000  # a real recipe has a few hundred values; aliases cannot multiply past this


class _Walk:
    """One pass over a composed YAML tree. Aliases share nodes, so a few hundred bytes can name billions of
    values ("billion laughs") or a value that contains itself: count what the walk expands and refuse both."""

    def __init__(self, constructor):
        self.constructor, self.lines, self.count, self.open = constructor, {}, 0, set()

    def value(self, node, loc: tuple) -> Any:
        self.count += 1
        if self.count > MAX_RECIPE_NODES:
            raise CompressError(f"line {node.start_mark.line + 1}: the recipe expands to more than "
                                f"{MAX_RECIPE_NODES:,} values (aliases repeated inside aliases?)")
        self.lines[loc] = node.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode):
            return self.constructor.construct_object(node)
        if id(node) in self.open:
            raise CompressError(f"line {node.start_mark.line + 1}: an alias refers to a value that contains it "
                                "(a recursive recipe)")
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.value(v, loc + (i,)) for i, v in enumerate(node.value)]
            out = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise CompressError(f"line {key_node.start_mark.line + 1}: a key must be a plain name, not a "
                                        f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}")
                key = self.constructor.construct_object(key_node)
                if key in out:
                    raise CompressError(f"line {key_node.start_mark.line + 1}: duplicate key '{key}'")
                self.lines[loc + (key,)] = key_node.start_mark.line + 1
                out[key] = self.value(value_node, loc + (key,))
            return out
        finally:
            self.open.discard(id(node))


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _explain(error: dict) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden":
        parent = loc[-2] if len(loc) > 1 and isinstance(loc[-2], int) and loc[0] == "stages" else None
        if parent is not None:
            return f"unknown stage '{loc[-1]}' (known: {', '.join(sorted(STAGES))})"
        return f"unknown key '{loc[-1]}'"
    if kind == "missing":
        return f"missing required key '{loc[-1]}'"
    message = error["msg"].removeprefix("Value error, ")
    if kind != "value_error" and "input" in error and not isinstance(error["input"], (dict, list)):
        message += f" (got {error['input']!r})"
    return message


def validation_message(err: ValidationError, source: str, lines: dict | None = None) -> str:
    """One line per problem: `FILE:LINE: key.path: what is wrong and what was expected`."""
    out = []
    for error in err.errors():
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        blamed = getattr((error.get("ctx") or {}).get("error"), "key", None)  # a SettingError's key
        loc += (blamed,) if blamed else ()
        line = None
        for n in range(len(loc), -1, -1):  # the deepest location that has a line
            if lines and loc[:n] in lines:
                line = lines[loc[:n]]
                break
        where = f"{source}:{line}" if line else source
        out.append(f"{where}: {_format_loc(loc)}: {_explain(error)}")
    return "\n".join(out)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CompressError(f"{path}: cannot read recipe ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise CompressError(f"{path}: not UTF-8 text (byte {e.start}); a recipe is a YAML file") from None
    if not text.strip():
        raise CompressError(f"{path}: the recipe is empty (it needs at least 'model' and 'stages')")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        walk = _Walk(loader)
        data = walk.value(node, ()) if node is not None else None
        lines = walk.lines
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise CompressError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except CompressError as e:
        raise CompressError(f"{path}:{str(e).removeprefix('line ')}") from None
    except RecursionError:
        raise CompressError(f"{path}: values nested too deeply to be a recipe") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise CompressError(f"{path}: a recipe is a mapping with at least 'model' and 'stages'")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise CompressError(validation_message(e, str(path), lines)) from None


def build_recipe(source: str = "command line", **fields) -> Recipe:
    """A recipe from the CLI's options, validated exactly like a YAML one."""
    try:
        return Recipe.model_validate(fields)
    except ValidationError as e:
        raise CompressError(validation_message(e, source)) from None
