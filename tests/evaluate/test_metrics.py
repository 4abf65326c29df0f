import math

import pytest
import torch

from minicpm_compress.evaluate import metrics, runners
from minicpm_compress.evaluate.evaluator import Evaluator
from minicpm_compress.evaluate.metrics import compare, reference_stats
from minicpm_compress.quant.qweight import QuantScheme, quantize

from ..conftest import tiny_model


def _windows(n=3, seq=24, seed=1):
    return torch.randint(0, 49152, (n, seq), generator=torch.Generator().manual_seed(seed))


def _direct(ref_model, model, windows):
    """Perplexity, exact KL and top-1 computed straight from both models' full distributions."""
    with torch.no_grad():
        p = torch.log_softmax(ref_model(windows).logits[:, :-1].double(), -1)
        q = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    targets = windows[:, 1:].unsqueeze(-1)
    ppl = math.exp(-q.gather(-1, targets).mean().item())
    ref_ppl = math.exp(-p.gather(-1, targets).mean().item())
    kld = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    return ppl, ref_ppl, kld, top1


@pytest.mark.parametrize("rows", [64, 5])  # 5: each batch's 46 positions compared in uneven chunks
def test_metrics_equal_a_direct_computation(monkeypatch, rows):
    monkeypatch.setattr(metrics, "COMPARE_ROWS", rows)
    ref_model, other = tiny_model("minicpm", seed=0), tiny_model("minicpm", seed=1)
    windows = _windows()
    m = compare(metrics.TorchRunner(other), windows, reference_stats(ref_model, windows, batch_size=2), batch_size=2)
    ppl, ref_ppl, kld, top1 = _direct(ref_model, other, windows)
    assert m.tokens == 3 * 23
    assert math.isclose(m.ppl, ppl, rel_tol=1e-5) and math.isclose(m.ref_ppl, ref_ppl, rel_tol=1e-5)
    assert math.isclose(m.kld, kld, rel_tol=1e-4) and kld > 0.01
    assert m.top1 == top1 and top1 < 1


def test_the_reference_against_itself_is_perfect():
    model = tiny_model("llama")
    windows = _windows()
    m = compare(metrics.TorchRunner(model), windows, reference_stats(model, windows))
    assert m.kld < 1e-6 and m.top1 == 1.0 and math.isclose(m.ppl, m.ref_ppl, rel_tol=1e-6)
    assert abs(m.ppl_increase) < 1e-6


def test_reference_statistics_are_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("MINICPM_COMPRESS_CACHE", str(tmp_path))
    model, windows = tiny_model("llama"), _windows()
    first = Evaluator.against(model, windows)
    calls = []
    monkeypatch.setattr(metrics, "reference_stats", lambda *a, **k: calls.append(1))
    second = Evaluator.against(model, windows)
    assert calls == [] and len(list((tmp_path / "reference").iterdir())) == 1
    assert torch.equal(first.reference.hidden, second.reference.hidden)
    assert torch.equal(first.reference.nll, second.reference.nll)


@pytest.mark.parametrize("scheme", [QuantScheme(bits=8, group_size=None, symmetric=True),
                                    QuantScheme(bits=4, group_size=32)], ids=lambda s: s.describe())
def test_head_logits_of_a_packed_head_equal_its_dequantized_product(scheme):
    head = quantize(torch.randn(23, 64, generator=torch.Generator().manual_seed(3)), scheme)
    hidden = torch.randn(2, 7, 64)
    expected = hidden @ head.dequantize().T
    for chunk in (5, 8192):  # slices of the vocabulary that do not divide it, and the whole of it at once
        torch.testing.assert_close(runners.head_logits(hidden, head, chunk), expected, atol=1e-5, rtol=1e-5)
    bf16 = head.dequantize().to(torch.bfloat16)
    torch.testing.assert_close(runners.head_logits(hidden, bf16, 5), hidden @ bf16.float().T, atol=1e-5, rtol=1e-5)
