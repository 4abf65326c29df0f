"""Knowledge distillation on calibration text: the project's one training loop.

QAT trains fake-quantized weights and their scales, pruning's healing trains the pruned model; both
minimise the KL divergence from a frozen teacher's next-token distribution to the student's
(optionally plus the next-token cross-entropy), on calibration text that never overlaps the held-out
evaluation text.

Deterministic: the batch order is a function of (seed, step) only, so a run resumed from a checkpoint
ends with the same weights as one that was never interrupted. Checkpoints hold the trainable tensors
and the optimizer state (plain tensors, loaded with `weights_only=True`), are written atomically to the
cache under a key derived from everything that determines the result, and are removed on completion.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .. import atomic
from ..cache import cache_dir
from ..progress import progress


class DistillSettings(BaseModel):
    """The training schedule shared by every stage that distils (QAT, pruning's healing)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=0, description="optimizer steps (0: no training)")
    batch_size: int = Field(4, ge=1, description="sequences per step")
    sequence_length: int = Field(256, ge=8, description="tokens per training sequence")
    samples: int = Field(128, ge=1, description="distinct training sequences drawn from the calibration text")
    lr: float = Field(1e-5, gt=0, description="peak learning rate of the weights (Adam); every rate decays linearly to 10%")
    ce_weight: float = Field(0.0, ge=0, description="weight of the next-token loss added to the KL divergence")
    checkpoint_every: int = Field(25, ge=0, description="steps between resume checkpoints (0: none)")


@dataclass
class ParamGroup:
    params: dict[str, torch.nn.Parameter]  # name → trainable tensor (names key the checkpoint)
    lr: float  # this group's peak learning rate


@dataclass
class TrainLog:
    steps: int
    tokens: int = 0
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    resumed_at: int | None = None

    def summary(self) -> dict:
        first, last = (self.losses[0], self.losses[-1]) if self.losses else (None, None)
        window = max(1, len(self.losses) // 10)  # mean of the first and last tenth: less noisy than one step
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 1),
            "tokens_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s else None,
            "loss_first": round(first, 5) if first is not None else None,
            "loss_last": round(last, 5) if last is not None else None,
            "loss_start_mean": round(sum(self.losses[:window]) / window, 5) if self.losses else None,
            "loss_end_mean": round(sum(self.losses[-window:]) / window, 5) if self.losses else None,
            "resumed_at_step": self.resumed_at,
        }


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The samples of `step`: consecutive positions in a per-epoch seeded permutation of range(n)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(order[i]))
    return out


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
                      ce_weight: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student), plus `ce_weight` × next-token cross-entropy."""
    vocab = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    loss = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    if ce_weight:
        targets = input_ids[:, 1:].reshape(-1)
        ce = F.cross_entropy(student_logits[:, :-1].reshape(-1, vocab).float(), targets)
        loss = loss + ce_weight * ce
    return loss


def checkpoint_path(*parts) -> Path:
    """The resume file for a run determined by `parts` (tensors are hashed by value)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().contiguous().cpu().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return cache_dir("train") / f"{h.hexdigest()[:24]}.pt"


def _lr_factor(step: int, steps: int) -> float:
    return 1.0 - 0.9 * step / max(1, steps)


def distill(student: torch.nn.Module, teacher: torch.nn.Module, groups: list[ParamGroup], tokens: torch.Tensor,
            settings: DistillSettings, seed: int, resume: Path | None = None, desc: str = "distill") -> TrainLog:
    """Train `groups` of `student` towards `teacher` on `tokens` [n, length]; return the log.

    Everything in `student` not listed in `groups` stays frozen. With `resume`, progress is saved there
    every `settings.checkpoint_every` steps and picked up from there if the file exists.
    """
    named = {name: p for g in groups for name, p in g.params.items()}
    trainable = {id(p) for p in named.values()}
    for p in student.parameters():
        p.requires_grad_(id(p) in trainable)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(
        [{"params": list(g.params.values()), "lr": g.lr} for g in groups], lr=settings.lr
    )
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    log = TrainLog(settings.steps)
    start = 0
    if resume is not None and resume.is_file():
        saved = torch.load(resume, weights_only=True)
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(saved["params"][name])
        optimizer.load_state_dict(saved["optimizer"])
        start = log.resumed_at = saved["step"]
        log.losses = list(saved["losses"])
        log.tokens = saved["tokens"]

    device, teacher_device = next(student.parameters()).device, next(teacher.parameters()).device
    student.eval()  # no dropout: the loss is a deterministic function of the weights
    teacher.eval()
    began = time.perf_counter()
    bar = progress(range(start, settings.steps), desc=desc, total=settings.steps, unit="step")
    if start:
        bar.update(start)
    for step in bar:
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * _lr_factor(step, settings.steps)
        ids = tokens[batch_indices(step, settings.batch_size, tokens.shape[0], seed)].to(device)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids.to(teacher_device), use_cache=False).logits.to(device)
        loss = distillation_loss(student(input_ids=ids, use_cache=False).logits, teacher_logits, ids,
                                 settings.ce_weight)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step} (lower the learning rate)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(named.values()), 1.0)
        optimizer.step()
        log.losses.append(loss.item())
        log.tokens += ids.numel()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if resume is not None and settings.checkpoint_every and done % settings.checkpoint_every == 0 \
                and done < settings.steps:
            _save(resume, done, named, optimizer, log)
    log.wall_s = time.perf_counter() - began
    for p in student.parameters():
        p.requires_grad_(False)
    if resume is not None:
        resume.unlink(missing_ok=True)
    return log


def _save(path: Path, step: int, named: dict[str, torch.nn.Parameter], optimizer, log: TrainLog) -> None:
    buffer = io.BytesIO()
    torch.save({
        "step": step,
        "params": {name: p.detach().clone() for name, p in named.items()},
        "optimizer": optimizer.state_dict(),
        "losses": log.losses,
        "tokens": log.tokens,
    }, buffer)
    atomic.write_bytes(path, buffer.getvalue())
