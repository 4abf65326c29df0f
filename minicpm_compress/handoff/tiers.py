"""Which file to ship for which device: computed from each deliverable's RAM estimate and accuracy.

A device tier is its RAM. A deliverable fits a tier when its RAM estimate at the recommendation's context
(or the shorter context its files were built for) is at most `MODEL_SHARE` of the device's RAM (the OS,
the app and other apps keep the rest: our assumption, stated in the card). Among the files of one runtime that fit, the most accurate (lowest KLD
against the original; the smaller file on a tie) is recommended.
"""

from __future__ import annotations

from .deliverables import Deliverable

TIERS_GB = (2, 3, 4, 6, 8, 12, 16)
MODEL_SHARE = 0.5
CONTEXT = 2048


def fits(d: Deliverable, ram_gb: float, context: int = CONTEXT) -> bool:
    ram = d.ram_bytes(min(context, d.max_context or context))  # a file built for less uses its own context
    return ram <= MODEL_SHARE * ram_gb * 1e9


def best(candidates: list[Deliverable], ram_gb: float, context: int = CONTEXT) -> Deliverable | None:
    fitting = [d for d in candidates if fits(d, ram_gb, context)]
    return min(fitting, key=lambda d: (d.metrics["kld"], d.bytes), default=None)


def recommendations(items: list[Deliverable],
                    context: int = CONTEXT) -> list[tuple[int, dict[str, Deliverable | None]]]:
    """Per tier (GB of RAM), per mobile runtime label: the deliverable to ship, or None when none fits."""
    from .runtimes import RUNTIMES

    order = [r.label for r in RUNTIMES.values()]
    runtimes = sorted({d.runtime.label for d in items if d.runtime.mobile}, key=order.index)
    return [(gb, {label: best([d for d in items if d.runtime.label == label], gb, context) for label in runtimes})
            for gb in TIERS_GB]
