"""`minicpm-compress compare OUT1 OUT2 …`: every artifact of several runs in one table and one plot.

Runs are comparable when they were measured against the same reference on the same held-out text; the
table marks the frontier: the artifacts no other one beats in both size and KLD.
"""

from __future__ import annotations

from pathlib import Path

from .. import manifest_schema
from ..errors import CompressError
from ..models.source import MANIFEST_NAME
from ..report import text_table
from . import plots
from .deliverables import Deliverable, deliverables

HEADER = ["run", "artifact", "runtime", "size", "bits/weight", "Δppl", "KLD", "top-1", "frontier"]


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise CompressError(f"{path}: not found; compare takes minicpm-compress output folders")
    return manifest_schema.read_manifest(path)


def _measured_on(manifest: dict) -> tuple:
    data = manifest["recipe"]["data"]
    return manifest["reference"], tuple(data["evaluation"]), manifest["stages"][0]["metrics"]["tokens"]


def gather(folders: list[Path]) -> list[tuple[str, Deliverable]]:
    """(run label, deliverable) for every artifact of every folder; refuses runs measured differently."""
    runs, first = [], None
    names = [Path(f).name for f in folders]
    labels = names if len(set(names)) == len(names) else [str(f) for f in folders]  # same names: whole paths
    for folder, label in zip(folders, labels):
        manifest = read_manifest(folder)
        basis = _measured_on(manifest)
        if first is None:
            first = (folder, basis)
        elif basis != first[1]:
            raise CompressError(f"{folder}: measured against {basis[0]} on {basis[2]} tokens of {', '.join(basis[1])}, "
                                f"but {first[0]} against {first[1][0]} on {first[1][2]} tokens of "
                                f"{', '.join(first[1][1])}: not comparable (rerun with the same reference and data)")
        items = deliverables(manifest)
        if not items:
            raise CompressError(f"{folder}: holds no artifact to compare (status {manifest['status']})")
        runs += [(label, d) for d in items]
    return runs


def points(runs: list[tuple[str, Deliverable]]) -> list[plots.Point]:
    return [plots.Point(f"{run}/{d.name.rstrip('/')}", d.bytes, d.metrics["kld"]) for run, d in runs]


def table(runs: list[tuple[str, Deliverable]]) -> str:
    front = {p.label for p in plots.pareto(points(runs))}
    rows = []
    for (run, d), p in sorted(zip(runs, points(runs)), key=lambda rp: rp[1].bytes):
        m = d.metrics
        rows.append([run, d.name, d.runtime.label, f"{d.bytes / 2**20:.1f} MiB",
                     f"{d.bits_per_weight:.2f}" if d.bits_per_weight else "-", f"{m['ppl_increase']:+.2%}",
                     f"{m['kld']:.4f}", f"{m['top1']:.2%}", "*" if p.label in front else ""])
    return text_table(HEADER, rows)


def compare(folders: list[Path], plot: Path | None = None) -> str:
    """The table (returned) and, if `plot` is given, the accuracy-vs-size PNG written there."""
    if len(folders) < 1:
        raise CompressError("compare: name at least one output folder")
    runs = gather(folders)
    if plot is not None:
        from .. import atomic

        atomic.write_bytes(Path(plot), plots.frontier(points(runs), "Accuracy vs size across runs"))
    return table(runs)
