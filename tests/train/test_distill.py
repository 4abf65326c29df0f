import copy

import pytest
import torch

from minicpm_compress.train.distill import DistillSettings, ParamGroup, batch_indices, distill, distillation_loss

from ..conftest import tiny_model


def test_batch_order_covers_every_sample_once_per_epoch_and_depends_only_on_seed_and_step():
    n, batch = 10, 4
    first_epoch = [i for step in range(5) for i in batch_indices(step, batch, n, seed=7)][:n]
    assert sorted(first_epoch) == list(range(n))
    assert batch_indices(3, batch, n, seed=7) == batch_indices(3, batch, n, seed=7)
    assert [batch_indices(s, batch, n, 7) for s in range(5)] != [batch_indices(s, batch, n, 8) for s in range(5)]


def test_loss_is_zero_for_identical_models_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    assert distillation_loss(logits, logits, ids, 0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits + torch.randn_like(logits), logits, ids, 0.0).item() > 0.01
    with_ce = distillation_loss(logits, logits, ids, 1.0).item()
    assert with_ce == pytest.approx(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11),
                                                                       ids[:, 1:].reshape(-1)).item(), rel=1e-5)


def _setup(seed=0):
    teacher = tiny_model("llama", seed=seed)
    student = tiny_model("llama", seed=seed)
    with torch.no_grad():  # a damaged copy of the teacher to heal
        for layer in student.model.layers:
            layer.mlp.down_proj.weight.mul_(0.5)
    tokens = torch.randint(0, 49152, (6, 16), generator=torch.Generator().manual_seed(0))
    groups = [ParamGroup({f"{i}.down": l.mlp.down_proj.weight for i, l in enumerate(student.model.layers)}, 1e-2)]
    return teacher, student, groups, tokens


def test_distillation_lowers_the_loss_and_touches_only_the_given_parameters():
    teacher, student, groups, tokens = _setup()
    frozen = copy.deepcopy(student.model.layers[0].self_attn.q_proj.weight)
    log = distill(student, teacher, groups, tokens, DistillSettings(steps=12, batch_size=2, lr=1e-2), seed=0)
    summary = log.summary()
    assert summary["loss_end_mean"] < 0.7 * summary["loss_start_mean"]
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight, frozen)
    assert log.tokens == 12 * 2 * 16


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    settings = DistillSettings(steps=5, batch_size=2, lr=1e-2, checkpoint_every=2)
    teacher, student, groups, tokens = _setup()
    distill(student, teacher, groups, tokens, settings, seed=3)
    uninterrupted = [p.detach().clone() for p in groups[0].params.values()]

    teacher, student, groups, tokens = _setup()
    resume = tmp_path / "resume.pt"
    calls = {"n": 0}
    real_loss = distillation_loss

    def failing_loss(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr("minicpm_compress.train.distill.distillation_loss", failing_loss)
    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, groups, tokens, settings, seed=3, resume=resume)
    assert resume.is_file()
    monkeypatch.setattr("minicpm_compress.train.distill.distillation_loss", real_loss)

    teacher, student, groups, tokens = _setup()  # a fresh process would start from the original weights
    log = distill(student, teacher, groups, tokens, settings, seed=3, resume=resume)
    assert log.resumed_at == 2 and len(log.losses) == 5
    assert not resume.exists()  # removed once complete
    for a, b in zip(groups[0].params.values(), uninterrupted):
        assert torch.equal(a, b)
