"""The report's figures as PNG bytes (matplotlib, Agg backend; byte-identical for the same manifest)."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

STAGE_COLOURS = {True: "#3b7dd8", None: "#8c8c8c", False: "#d83b3b"}  # gate passed / none / failed


@dataclass(frozen=True)
class Point:
    """One variant on the accuracy-vs-size plane."""
    label: str
    bytes: int
    kld: float


def _figure(width: float = 7.5, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # labels carry user strings (folder, model and run names): never read them as math text ("$x$")
    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "minicpm-compress", "text.parse_math": False})
    return plt, *plt.subplots(figsize=(width, height), dpi=100)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def stage_accuracy(manifest: dict) -> bytes:
    """KLD and Δppl of every stage against the reference; bar colour says the gate's verdict."""
    plt, fig, ax = _figure()
    stages = manifest["stages"]
    labels = [f"{s['index']} {s['name']}" for s in stages]
    xs = range(len(stages))
    ax.bar(xs, [s["metrics"]["kld"] for s in stages], color=[STAGE_COLOURS[s["gate_passed"]] for s in stages])
    ax.set_ylabel("KLD vs reference (nats)")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    twin = ax.twinx()
    twin.plot(list(xs), [100 * s["metrics"]["ppl_increase"] for s in stages], "o-", color="#222222")
    twin.set_ylabel("Δppl (%, line)")
    ax.set_title("Accuracy after each stage (blue: gate passed, grey: no gate, red: failed)")
    return _png(plt, fig)


def sizes(points: list[Point]) -> bytes:
    plt, fig, ax = _figure(height=max(2.0, 0.45 * len(points) + 1))
    ax.barh(range(len(points)), [p.bytes / 2**20 for p in points], color="#3b7dd8")
    ax.set_yticks(range(len(points)), [p.label for p in points])
    ax.invert_yaxis()
    ax.set_xlabel("size (MiB)")
    ax.set_title("Artifact sizes")
    return _png(plt, fig)


def pareto(points: list[Point]) -> list[Point]:
    """The points no other point beats in both size and KLD, smallest first."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p.bytes, p.kld)):
        if p.kld < best:
            front.append(p)
            best = p.kld
    return front


def frontier(points: list[Point], title: str = "Accuracy vs size") -> bytes:
    plt, fig, ax = _figure(height=4.0)
    ax.scatter([p.bytes / 2**20 for p in points], [p.kld for p in points], color="#8c8c8c", zorder=2)
    front = pareto(points)
    ax.plot([p.bytes / 2**20 for p in front], [p.kld for p in front], "o-", color="#3b7dd8", zorder=3,
            label="frontier: nothing is both smaller and closer")
    for p in points:
        ax.annotate(p.label, (p.bytes / 2**20, p.kld), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("size (MiB)")
    ax.set_ylabel("KLD vs original (nats, lower is better)")
    ax.legend(loc="upper right")
    ax.set_title(title)
    return _png(plt, fig)


def layer_of(name: str) -> tuple[int, str] | None:
    m = re.search(r"layers\.(\d+)\.(?:\w+\.)?(\w+)$", name)
    return (int(m.group(1)), m.group(2)) if m else None


def linear_errors(stage: dict) -> bytes | None:
    """Per-layer sensitivity: each linear kind's relative output error after quantization, layer by layer."""
    errors = stage["details"].get("linear_errors")
    if not errors:
        return None
    series: dict[str, dict[int, float]] = {}
    for name, err in errors.items():
        where = layer_of(name)
        if where:
            series.setdefault(where[1], {})[where[0]] = err
    plt, fig, ax = _figure()
    for kind, values in sorted(series.items()):
        layers = sorted(values)
        ax.plot(layers, [values[i] for i in layers], ".-", label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative output error")
    ax.legend(ncol=4, fontsize=7)
    ax.set_title(f"Stage {stage['index']} {stage['name']}: quantization error per linear (calibration text)")
    return _png(plt, fig)


def awq_scales(stage: dict) -> bytes | None:
    """AWQ's chosen scale exponent α per scaling group, layer by layer (below 0: identity kept)."""
    alphas = stage["details"].get("alphas")
    layers = 1 + max((w[0] for w in map(layer_of, stage["details"].get("linear_errors", {})) if w), default=-1)
    if not alphas or not layers or len(alphas) % layers:
        return None
    per = len(alphas) // layers
    plt, fig, ax = _figure()
    for g in range(per):
        ax.plot(range(layers), alphas[g::per], ".-", label=f"group {g + 1} of each layer")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("α (scales = mean|x|^α)")
    ax.legend(fontsize=7)
    ax.set_title(f"Stage {stage['index']} awq: chosen scale exponent per group")
    return _png(plt, fig)


def block_influence(stage: dict) -> bytes | None:
    values = stage["details"].get("block_influence")
    if not values:
        return None
    plt, fig, ax = _figure()
    removed = set(stage["details"].get("removed_layers", []))
    ax.bar(range(len(values)), values, color=["#d83b3b" if i in removed else "#3b7dd8" for i in range(len(values))])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("block influence")
    ax.set_title(f"Stage {stage['index']} prune: layer importance (red: removed)")
    return _png(plt, fig)
