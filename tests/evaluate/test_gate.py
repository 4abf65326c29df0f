from minicpm_compress.evaluate.gate import Gate
from minicpm_compress.evaluate.metrics import Metrics

M = Metrics(ppl=44.0, kld=0.2, top1=0.7, ref_ppl=40.0, tokens=100)  # +10% perplexity


def test_passing_gate_has_no_failures():
    assert Gate(max_ppl_increase=0.11, max_kld=0.21, min_top1=0.69).failures(M) == []
    assert Gate().failures(M) == []


def test_each_threshold_fails_with_its_numbers():
    failures = Gate(max_ppl_increase=0.05, max_kld=0.1, min_top1=0.8).failures(M)
    assert failures == [
        "perplexity +10.00% > allowed +5.00%",
        "KL divergence 0.2 > allowed 0.1",
        "top-1 agreement 70.00% < required 80.00%",
    ]
