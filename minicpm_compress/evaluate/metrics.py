"""Perplexity, KL divergence and top-1 agreement of a runner against cached reference statistics.

The reference's full next-token distributions are too large to keep (32k tokens × a 49k vocabulary is
6 GB in float32). Instead the cache keeps what reproduces them exactly: the reference's final hidden
states (the input of its output head, [tokens, hidden]) and the output head's weight. Each comparison
recomputes the reference logits from them with one matrix product (about a fifth of a forward pass for
the built-in models), so KL divergence and top-1 agreement are exact, not estimated from a top-k.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file

from .. import atomic
from ..cache import cache_dir
from ..data.prompts import ImagePrompts, scored_mask, token_ids
from ..progress import progress
from .runners import Runner, StreamedRunner, TorchRunner, head_logits, logit_batches

CACHE_VERSION = "4"


@dataclass
class ReferenceStats:
    hidden: torch.Tensor  # [scored positions, hidden]: input of the output head at each scored position
    head: torch.Tensor  # [vocab, hidden] output head weight, in the dtype the checkpoint stores it
    nll: torch.Tensor  # [scored positions] reference NLL of the true next token

    @property
    def ppl(self) -> float:
        return math.exp(self.nll.double().mean().item())

    def log_probs(self, sl: slice) -> torch.Tensor:
        return torch.log_softmax(head_logits(self.hidden[sl], self.head), dim=-1)


@dataclass(frozen=True)
class Metrics:
    ppl: float
    kld: float
    top1: float
    ref_ppl: float
    tokens: int
    image_cosine: float | None = None  # MiniCPM-V: image features vs the reference's (mean cosine per row)

    @property
    def ppl_increase(self) -> float:
        """Relative perplexity increase over the reference (0.05 = +5%)."""
        return self.ppl / self.ref_ppl - 1.0

    def as_dict(self) -> dict:
        d = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in asdict(self).items() if v is not None}
        d["ppl_increase"] = float(f"{self.ppl_increase:.6g}")
        return d


def _log_probs(runner: Runner, windows, batch_size: int, desc: str):
    """Yield (slice of the scored positions, their log-probs [n, V], next-token targets [n], the batch's scored
    mask [B, seq-1]) for each batch of `windows` (token ids, or image prompts scored after the image)."""
    ids_all, mask_all = token_ids(windows), scored_mask(windows)
    with progress(total=ids_all.numel(), desc=desc, unit="tok") as bar:
        start = flat = 0
        for logits in logit_batches(runner, windows, batch_size):
            ids, mask = ids_all[start : start + logits.shape[0]], mask_all[start : start + logits.shape[0]]
            logp = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)
            del logits  # not needed past here: at a 73k vocabulary, 150 MB per 512 tokens
            yield slice(flat, flat + logp.shape[0]), logp, ids[:, 1:][mask], mask
            start += ids.shape[0]
            flat += logp.shape[0]
            bar.update(ids.numel())


def _nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def reference_stats(subject, windows: torch.Tensor, batch_size: int = 4) -> ReferenceStats:
    """Run the full-precision model (a ModelState, streamed, or a module) once over `windows`, keeping its
    head inputs and NLLs."""
    from ..state import ModelState

    captured = []
    if isinstance(subject, ModelState):
        runner, hook = StreamedRunner(subject, quantized=False, capture=captured), None
        head_weight = runner.head()
    else:
        head = subject.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("output heads with a bias are not supported by the reference cache")
        head_weight = head.weight.detach().float().clone()
        hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0][:, :-1].detach().float()))
        runner = TorchRunner(subject)
    try:
        nll, hidden = [], []
        for _sl, logp, targets, mask in _log_probs(runner, windows, batch_size, "reference"):
            nll.append(_nll(logp, targets))
            hidden.append(captured.pop()[mask])
    finally:
        if hook is not None:
            hook.remove()
    return ReferenceStats(torch.cat(hidden).contiguous(), head_weight, torch.cat(nll))


COMPARE_ROWS = 64  # positions compared at once: each [rows, vocabulary] float32 temporary stays small


def compare(runner: Runner, windows: torch.Tensor, ref: ReferenceStats, batch_size: int = 4,
            desc: str = "evaluate") -> Metrics:
    nll_sum = kld_sum = agree = 0.0
    for sl, logq, targets, _mask in _log_probs(runner, windows, batch_size, desc):
        nll_sum += _nll(logq, targets).double().sum().item()
        for first in range(0, logq.shape[0], COMPARE_ROWS):  # the reference's log-probs a few rows at a time
            q = logq[first : first + COMPARE_ROWS]
            logp = ref.log_probs(slice(sl.start + first, sl.start + first + q.shape[0]))
            agree += (q.argmax(-1) == logp.argmax(-1)).sum().item()
            kld_sum += (logp.exp() * (logp - q)).sum(-1).double().sum().item()
    tokens = ref.nll.numel()
    return Metrics(
        ppl=math.exp(nll_sum / tokens), kld=max(kld_sum / tokens, 0.0), top1=agree / tokens, ref_ppl=ref.ppl,
        tokens=tokens,
    )


def reference_metrics(ref: ReferenceStats, images: bool = False) -> Metrics:
    return Metrics(ppl=ref.ppl, kld=0.0, top1=1.0, ref_ppl=ref.ppl, tokens=ref.nll.numel(),
                   image_cosine=1.0 if images else None)


def feature_cosine(reference: list[torch.Tensor], features: list[torch.Tensor]) -> float:
    """Mean cosine similarity of corresponding image-feature rows."""
    a, b = torch.cat(reference).double(), torch.cat(features).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def cached_reference_stats(fingerprint: str, windows: torch.Tensor, load_subject, batch_size: int = 4) -> ReferenceStats:
    """Reference statistics for (model fingerprint, windows), computed once and kept in the cache."""
    h = hashlib.sha256(f"{CACHE_VERSION}:{fingerprint}:{tuple(windows.shape)}:".encode())
    if isinstance(windows, ImagePrompts):
        h.update(windows.fingerprint().encode())
    else:
        h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    path = cache_dir("reference") / f"{h.hexdigest()[:40]}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return ReferenceStats(t["hidden"], t["head"], t["nll"])
    stats = reference_stats(load_subject(), windows, batch_size)
    atomic.save_safetensors({"hidden": stats.hidden, "head": stats.head, "nll": stats.nll}, path)
    return stats
