import pytest
import torch

from minicpm_compress.prune.refit import output_error, refit_columns, remove_units

from ..quant.test_gptq import _layer


def _units(columns: int, width: int = 1) -> torch.Tensor:
    return torch.arange(columns).reshape(-1, width)


def test_the_refit_is_the_least_squares_solution_on_the_calibration_inputs():
    torch.manual_seed(0)
    x = torch.randn(512, 40, dtype=torch.float64) @ (torch.randn(40, 40, dtype=torch.float64) / 6 + torch.eye(40))
    w = torch.randn(12, 40, dtype=torch.float64)
    keep = torch.arange(0, 40, 2)
    refit = refit_columns(w, x.T @ x, keep, dampening=1e-12)
    solution = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T  # min ‖X Wᵀ − X_K W_Kᵀ‖
    assert torch.allclose(refit[:, keep], solution, atol=1e-6)
    assert (refit[:, 1::2] == 0).all()


def test_on_a_fixed_layer_the_refit_lowers_the_output_error_of_the_cut():
    w, gram = _layer(cols=256, out=96)
    keep = torch.arange(256)[torch.randperm(256, generator=torch.Generator().manual_seed(1))[:180]].sort().values
    cut = torch.zeros_like(w)
    cut[:, keep] = w[:, keep]
    refit = refit_columns(w, gram, keep)
    assert output_error(w, refit, gram) < 0.6 * output_error(w, cut, gram)  # measured 0.42


def _redundant_layer():
    """Inputs where 64 loud channels each have a near-copy: the refit lets one of a pair stand in for both."""
    torch.manual_seed(0)
    base = torch.randn(2048, 128) * torch.cat([torch.full((64,), 3.0), torch.ones(64)])
    x = torch.cat([base, base[:, :64] + 0.05 * torch.randn(2048, 64)], dim=1)
    return torch.randn(48, 192), x.T @ x


def test_choosing_by_the_error_after_the_refit_beats_choosing_by_energy():
    w, gram = _redundant_layer()
    energy = torch.diagonal(gram) * (w**2).sum(0)  # the activation score, ‖h_j‖² ‖W_j‖²
    by_energy = torch.topk(energy, 128).indices.sort().values
    refit_energy = refit_columns(w, gram, by_energy)
    keep, refit_chosen = remove_units(w, gram, _units(192), 64, block=4)
    assert len(keep) == 128 and (refit_chosen[:, [i for i in range(192) if i not in keep.tolist()]] == 0).all()
    assert output_error(w, refit_chosen, gram) < 0.5 * output_error(w, refit_energy, gram)
    # and the greedy choice's weights are the least-squares refit of the set it kept
    assert torch.allclose(refit_chosen, refit_columns(w, gram, keep), rtol=1e-4, atol=1e-5)


def test_whole_groups_of_columns_are_removed_together():
    w, gram = _layer(cols=64, out=32)
    w[:, 16:32] *= 1e-3  # group 1 carries almost nothing
    keep, refit = remove_units(w, gram, _units(64, 16), 2)
    assert 1 in set(range(4)) - set(keep.tolist()) and len(keep) == 2
    removed = [g for g in range(4) if g not in keep.tolist()]
    assert all((refit[:, g * 16:(g + 1) * 16] == 0).all() for g in removed)


@pytest.mark.parametrize("remove", [0, 1])
def test_removing_nothing_changes_nothing(remove):
    w, gram = _layer(cols=32, out=8)
    keep, refit = remove_units(w, gram, _units(32), remove)
    assert len(keep) == 32 - remove
    if remove == 0:
        assert torch.equal(refit, w)
