"""The shape of manifest.json, checked wherever a manifest is read back (`compare`, `--model OUT`, the stage
cache's records), so a damaged or hand-edited one is refused with one line naming the key instead of failing
somewhere later. Keys this schema does not name are allowed (newer writers may add them).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import CompressError


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow")


class MetricsEntry(_Entry):
    ppl: float
    kld: float
    top1: float
    ref_ppl: float
    tokens: int = Field(ge=1)
    image_cosine: float | None = None


class ManifestMetrics(MetricsEntry):
    ppl_increase: float


class ArtifactEntry(_Entry):
    path: str
    format: str
    bits: int | None
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    stage: int | None = None

    @field_validator("path")
    @classmethod
    def _inside_the_folder(cls, value: str):
        parts = PurePosixPath(value).parts
        if not parts or value.startswith("/") or ".." in parts or "\\" in value:
            raise ValueError(f"an artifact path is relative to the output folder, got {value!r}")
        return value


class StageEntry(_Entry):
    index: int = Field(ge=0)
    name: str
    settings: dict
    details: dict
    metrics: ManifestMetrics
    gate: dict | None
    gate_passed: bool | None
    failures: list[str]
    wall_s: float


class ToolEntry(_Entry):
    name: Literal["minicpm-compress"]
    version: str


class SourceEntry(_Entry):
    checkpoint: str
    weights_sha256: str | None


class DataEntry(_Entry):
    evaluation: list[str] = Field(min_length=1)


class RecipeEntry(_Entry):
    name: str
    data: DataEntry


class Manifest(_Entry):
    tool: ToolEntry
    status: Literal["passed", "failed"]
    model: str | None
    reference: str
    source: SourceEntry | None = None
    recipe: RecipeEntry
    stages: list[StageEntry] = Field(min_length=1)
    artifacts: list[ArtifactEntry]
    memory_estimate: dict | None = None


class CachedStage(_Entry):
    """A stage-cache entry's record.json (metrics unrounded, as measured)."""

    settings: dict
    details: dict
    metrics: MetricsEntry
    wall_s: float
    artifacts: list[ArtifactEntry]
    transforms: bool


def first_problem(error: ValidationError) -> str:
    """The first thing wrong, as `key.path: what` (a manifest has one writer: one problem is enough to refuse it)."""
    e = error.errors()[0]
    loc = ""
    for part in e["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    message = "missing" if e["type"] == "missing" else e["msg"].removeprefix("Value error, ")
    return f"{loc or '(top level)'}: {message}"


def read_json(path: Path, schema: type[BaseModel], what: str) -> dict:
    """The JSON file at `path` as a dict, checked against `schema`; one CompressError line naming the key if not."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompressError(f"{path}: not found") from None
    except OSError as e:
        raise CompressError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CompressError(f"{path}: not {what} (not JSON)") from None
    try:
        schema.model_validate(data)
    except ValidationError as e:
        raise CompressError(f"{path}: not {what}: {first_problem(e)}") from None
    return data


def read_manifest(path: Path) -> dict:
    """An output folder's manifest.json, validated."""
    return read_json(path, Manifest, "a minicpm-compress manifest")
