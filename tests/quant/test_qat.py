import copy

import pytest
import torch

from minicpm_compress.data.textsets import evaluation_windows
from minicpm_compress.models.architectures import quantizable_linears
from minicpm_compress.models.source import ModelSource
from minicpm_compress.quant.awq import AWQConfig, apply_awq
from minicpm_compress.quant.qat import QATConfig, apply_qat, attach_fake_quant, detach_fake_quant
from minicpm_compress.quant.qweight import QuantScheme, quantize
from minicpm_compress.recipe import build_recipe
from minicpm_compress.stages import RunContext
from minicpm_compress.state import ModelState

from ..conftest import tiny_model

TRAIN = {"batch_size": 4, "sequence_length": 32, "samples": 32, "checkpoint_every": 0}


def _context(teacher, **data):
    recipe = build_recipe(model="minicpm-smollm2", data={"calibration_samples": 4, "sequence_length": 64, **data},
                          stages=[{"qat": {}}])
    return RunContext(recipe, reference_model=teacher)


def _state(tokenizer, model_type="minicpm"):
    model = tiny_model(model_type)
    return ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))


@pytest.mark.parametrize("scheme", [
    {"bits": 4, "group_size": 32, "symmetric": True},
    {"bits": 4, "group_size": 32, "symmetric": False},
    {"bits": 4, "group_size": 32, "symmetric": False, "zero_point": "float"},
])
def test_zero_steps_reproduce_the_awq_initialisation_exactly(tokenizer, scheme):
    state = _state(tokenizer)
    teacher = copy.deepcopy(state.model)
    ctx = _context(teacher)
    apply_awq(AWQConfig(**scheme, int8_linears=2), state, ctx)
    awq_weights = {n: l.weight.clone() for n, l in quantizable_linears(state.model).items()}
    awq_q = dict(state.qweights)
    outcome = apply_qat(QATConfig(**scheme, steps=0, **TRAIN), state, ctx)
    assert outcome.details["initialised_from"] == {"given": len(awq_q), "rtn": 0}
    for name, q in awq_q.items():
        got = state.qweights[name]
        assert got.scheme == q.scheme  # the two int8 linears stay int8
        assert torch.equal(got.codes, q.codes) and torch.equal(got.scales, q.scales)
        assert (got.zeros is None and q.zeros is None) or torch.equal(got.zeros, q.zeros)
        assert torch.equal(state.model.get_submodule(name).weight, awq_weights[name])


def test_training_lowers_the_distillation_loss_and_improves_the_quantized_model(tokenizer):
    state = _state(tokenizer)
    teacher = copy.deepcopy(state.model)
    scheme = {"bits": 4, "group_size": 32, "symmetric": True}
    ctx = _context(teacher)
    ids = evaluation_windows(tokenizer, ["austen-heldout"], 128, 32)  # text it is not trained on

    def kl_to_teacher(s):
        with torch.no_grad():
            log_t = torch.log_softmax(teacher(ids).logits, -1)
            log_s = torch.log_softmax(s.evaluated_model()(ids).logits, -1)
        return torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="batchmean").item()

    rtn = copy.deepcopy(state)
    rtn.qweights = {n: quantize(l.weight, QuantScheme(**scheme)) for n, l in quantizable_linears(rtn.model).items()}
    outcome = apply_qat(QATConfig(**scheme, steps=48, lr=1e-3, scale_lr=1e-2, **TRAIN), state, ctx)
    d = outcome.details
    assert d["initialised_from"] == {"given": 0, "rtn": 14}
    assert d["steps"] == 48 and d["tokens"] == 48 * 4 * 32
    assert d["loss_end_mean"] < 0.7 * d["loss_start_mean"]
    # measured 0.183-0.184 vs 0.203 on the full symmetric grid (0.211 vs 0.270 on the old max/7 grid, whose
    # RTN start was worse); longer training or other rates did not widen the gap on this 2-layer model
    assert kl_to_teacher(state) < 0.93 * kl_to_teacher(rtn)


def test_exported_codes_are_exactly_what_the_trained_model_computed_with(tokenizer):
    model = tiny_model("minicpm")
    scheme = QuantScheme(bits=4, group_size=32)
    wrapped, _ = attach_fake_quant(model, {}, scheme)
    torch.manual_seed(0)
    with torch.no_grad():  # as training would: move weights and scales
        for m in wrapped.values():
            m.linear.weight.add_(torch.randn_like(m.linear.weight) * 0.01)
            m.gain.add_(torch.randn_like(m.gain) * 0.05)
    ids = torch.randint(0, 49152, (2, 16))
    with torch.no_grad():
        trained = model(ids).logits
    fake = {n: m.quantized_weight().detach() for n, m in wrapped.items()}
    qweights = detach_fake_quant(model, wrapped)
    for name, q in qweights.items():
        assert torch.equal(q.dequantize(), fake[name])
        assert torch.equal(q.scales, q.scales.half().float())
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"), qweights)
    with torch.no_grad():
        assert torch.equal(state.evaluated_model()(ids).logits, trained)
