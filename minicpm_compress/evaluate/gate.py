"""Accuracy gates: thresholds relative to the full-precision reference, checked after every stage."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .metrics import Metrics


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_ppl_increase: float | None = Field(None, ge=0, description="relative, e.g. 0.05 = perplexity at most +5%")
    max_kld: float | None = Field(None, ge=0, description="mean KL divergence (nats) from the reference")
    min_top1: float | None = Field(None, ge=0, le=1, description="share of positions whose top-1 token agrees")
    min_image_cosine: float | None = Field(None, ge=-1, le=1, description="MiniCPM-V: mean cosine similarity of "
                                           "the image features (resampler outputs) to the reference's")

    def failures(self, m: Metrics) -> list[str]:
        """Human-readable reasons the metrics fail this gate (empty if it passes)."""
        out = []
        if self.max_ppl_increase is not None and m.ppl_increase > self.max_ppl_increase:
            out.append(f"perplexity +{m.ppl_increase:.2%} > allowed +{self.max_ppl_increase:.2%}")
        if self.max_kld is not None and m.kld > self.max_kld:
            out.append(f"KL divergence {m.kld:.4g} > allowed {self.max_kld:.4g}")
        if self.min_top1 is not None and m.top1 < self.min_top1:
            out.append(f"top-1 agreement {m.top1:.2%} < required {self.min_top1:.2%}")
        if self.min_image_cosine is not None and m.image_cosine is not None and m.image_cosine < self.min_image_cosine:
            out.append(f"image-feature cosine {m.image_cosine:.4f} < required {self.min_image_cosine:.4f}")
        return out
