import pytest
import torch

from minicpm_compress.errors import CompressError
from minicpm_compress.quant.qweight import (
    QuantScheme, encode, fake_quantize, full_grid, load_qweights, per_column, quantize, quantize_rows, rounded,
    save_qweights,
)

SCHEMES = [
    QuantScheme(bits=4, group_size=128),
    QuantScheme(bits=4, group_size=32, symmetric=True),
    QuantScheme(bits=4, group_size=None),
    QuantScheme(bits=8, group_size=None, symmetric=True),
    QuantScheme(bits=8, group_size=64),
    QuantScheme(bits=4, group_size=32, zero_point="float"),
]


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(48, 200) * 0.05  # 200 columns: the last group of 128/64/32 is narrower


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_codes_in_range_and_error_within_half_a_step(weight, scheme):
    q = quantize(weight, scheme)
    lo, hi = (-(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1) if scheme.symmetric else (0, 2**scheme.bits - 1)
    assert q.codes.shape == weight.shape
    assert lo <= q.codes.min() and q.codes.max() <= hi
    step = per_column(q.scales, q.group_size, weight.shape[1]).abs()
    # rounding costs at most half a step; float16 rounding of the scale/offset adds a sliver; on the full
    # symmetric grid the side opposite a group's peak ends at code 7 of the peak's 8 steps: up to one step
    bound = step * 0.5 + 1e-3 * weight.abs().max()
    if full_grid(scheme):
        bound = torch.where(q.codes == hi, step + 1e-3 * weight.abs().max(), bound)
    assert ((q.dequantize() - weight).abs() <= bound).all()


def test_the_full_symmetric_grid_uses_all_sixteen_codes_and_errs_less_than_max_over_seven(weight):
    """int4 symmetric: each group's largest-magnitude weight takes code −8 with a scale of the opposite sign
    (llama.cpp's Q4_0 rule), so 16 codes are in use, and the rounding error is below the 15-code grid's."""
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True)
    q = quantize(weight, scheme)
    groups = weight[:, :192].reshape(48, -1, 32)
    peak = groups.gather(2, groups.abs().argmax(2, keepdim=True)).squeeze(2)
    codes = q.codes[:, :192].reshape(48, -1, 32)
    assert (codes.gather(2, groups.abs().argmax(2, keepdim=True)) == -8).all()
    assert (torch.sign(q.scales[:, :6]) == -torch.sign(peak)).all() and (q.scales < 0).any() and (q.scales > 0).any()
    assert set(q.codes.unique().tolist()) == set(range(-8, 8))
    seven = (groups.abs().amax(2, keepdim=True) / 7).half().float()  # the grid before: max|w| / 7, codes −7…7
    before = ((torch.clamp(torch.round(groups / seven), -7, 7) * seven - groups) ** 2).mean()
    after = ((q.dequantize()[:, :192] - weight[:, :192]) ** 2).mean()
    assert after < 0.9 * before  # measured 0.78× on this Gaussian weight
    # int8 keeps llama.cpp's Q8_0 rule (max|w| / 127, positive scales): Q8_0 files' codes are reproduced
    assert (quantize(weight, QuantScheme(bits=8, group_size=32, symmetric=True)).scales > 0).all()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_fake_quantize_and_encode_reproduce_the_quantizer_exactly(weight, scheme):
    q = quantize(weight, scheme, clip=torch.full((weight.shape[0], 1), 0.9))
    again = encode(weight, q.scales, q.zeros, scheme)
    assert torch.equal(again.codes, q.codes)
    assert torch.equal(fake_quantize(weight, q.scales, q.zeros, scheme), q.dequantize())


@pytest.mark.parametrize("scheme", SCHEMES + [QuantScheme(layout=name) for name in ("Q4_K", "Q6_K", "Q3_K", "IQ4_NL")],
                         ids=lambda s: s.describe())
@pytest.mark.parametrize("cols", [200, 512])
def test_rounded_is_quantize_then_dequantize_bit_for_bit(scheme, cols):
    """What the scale searches score candidates by, computed per group without packing codes."""
    w = torch.randn(24, cols, generator=torch.Generator().manual_seed(cols)) * 0.05
    clip = torch.full((24, 1), 0.9)
    q = quantize(w, scheme, clip=clip)
    assert torch.equal(rounded(w, scheme, clip), q.dequantize())
    assert torch.equal(rounded(w, scheme, params=(q.scales, q.zeros)), q.dequantize())
    assert not torch.equal(rounded(w, scheme), q.dequantize())  # the clip was applied


@pytest.mark.parametrize("scheme", SCHEMES[:3], ids=lambda s: s.describe())
def test_fake_quantize_passes_gradients_straight_through_and_to_the_scales(weight, scheme):
    q = quantize(weight, scheme, clip=torch.full((weight.shape[0], 1), 0.7))  # some values clamp
    w = weight.clone().requires_grad_(True)
    scales = q.scales.clone().requires_grad_(True)
    fake_quantize(w, scales, q.zeros, scheme).sum().backward()
    lo, hi = (-(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1) if scheme.symmetric else (0, 2**scheme.bits - 1)
    codes = encode(weight, q.scales, q.zeros, scheme).codes.float()
    unclamped = (codes > lo) & (codes < hi)  # a code strictly inside the range was not clamped
    assert torch.equal(w.grad[unclamped], torch.ones_like(w.grad[unclamped]))  # straight through
    assert (w.grad[codes == hi] == 0).any() and (w.grad == 0).sum() > 0  # clamped weights get none
    assert scales.grad.abs().sum() > 0


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_scales_are_float16_exact(weight, scheme):
    q = quantize(weight, scheme)
    assert torch.equal(q.scales, q.scales.half().float())
    if q.zeros is not None and q.zeros.is_floating_point():
        assert torch.equal(q.zeros, q.zeros.half().float())


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.symmetric or s.zero_point == "float"],
                         ids=lambda s: s.describe())
def test_requantizing_on_the_same_grid_is_lossless(weight, scheme):
    """Symmetric and float-offset grids are recovered exactly from their own dequantized values."""
    q = quantize(weight, scheme)
    again = quantize(q.dequantize(), scheme)
    assert torch.equal(again.dequantize(), q.dequantize())


def test_more_bits_and_smaller_groups_mean_less_error(weight):
    def err(scheme):
        return ((quantize(weight, scheme).dequantize() - weight) ** 2).mean().item()

    assert err(QuantScheme(bits=8, group_size=None, symmetric=True)) < err(QuantScheme(bits=4, group_size=32)) / 50
    assert err(QuantScheme(bits=4, group_size=32)) < err(QuantScheme(bits=4, group_size=128))
    assert err(QuantScheme(bits=4, group_size=128)) < err(QuantScheme(bits=4, group_size=None))


def test_clip_shrinks_the_range(weight):
    scheme = QuantScheme(bits=4, group_size=None, symmetric=True)
    full, clipped = quantize(weight, scheme), quantize(weight, scheme, clip=torch.full((48, 1), 0.5))
    torch.testing.assert_close(clipped.scales, (full.scales * 0.5).half().float(), rtol=1e-3, atol=0)
    # code −8 stands for the clipped peak itself: nothing beyond half the original range
    assert clipped.dequantize().abs().max() <= weight.abs().max() * 0.5 * 1.001


def test_save_load_round_trip_is_exact(tmp_path, weight):
    qweights = {f"layer{i}": quantize(weight * (i + 1), s) for i, s in enumerate(SCHEMES)}
    save_qweights(qweights, tmp_path / "q.safetensors")
    back = load_qweights(tmp_path / "q.safetensors")
    assert back.keys() == qweights.keys()
    for name, q in qweights.items():
        assert back[name].scheme == q.scheme
        assert torch.equal(back[name].codes, q.codes) and torch.equal(back[name].dequantize(), q.dequantize())


def test_stored_weights_are_read_on_use_and_an_unchanged_set_is_saved_as_a_copy(tmp_path, weight):
    qweights = {f"layer{i}": quantize(weight * (i + 1), s) for i, s in enumerate(SCHEMES)}
    save_qweights(qweights, tmp_path / "q.safetensors")
    stored = load_qweights(tmp_path / "q.safetensors")
    assert not stored.held and stored["layer1"] is not stored["layer1"]  # read anew on every use, nothing kept
    save_qweights(stored, tmp_path / "copy.safetensors")
    assert (tmp_path / "copy.safetensors").read_bytes() == (tmp_path / "q.safetensors").read_bytes()

    stored["extra"] = qweights["layer0"]  # a later stage's weight is held; a removed one is gone
    del stored["layer1"]
    assert "layer1" not in stored and stored["extra"] is qweights["layer0"] and not stored.unchanged
    assert sorted(stored) == sorted(set(qweights) - {"layer1"} | {"extra"}) and len(stored) == len(qweights)
    with pytest.raises(KeyError):
        stored["layer1"]
    save_qweights(stored, tmp_path / "changed.safetensors")
    back = load_qweights(tmp_path / "changed.safetensors")
    assert sorted(back) == sorted(stored)
    assert torch.equal(back["extra"].dequantize(), qweights["layer0"].dequantize())
    (tmp_path / "q.safetensors").unlink()  # the file is read when a weight is used: a vanished file is named
    with pytest.raises(CompressError, match="q.safetensors: unreadable quantized-weights file"):
        stored["layer0"]


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CompressError, match="other.safetensors: not a minicpm-compress-qweights"):
        load_qweights(tmp_path / "other.safetensors")


def test_bad_group_size_is_refused():
    with pytest.raises(ValueError, match="group_size must be a multiple of 8"):
        QuantScheme(group_size=30)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cols", [32, 33, 72])
def test_int4_codes_are_held_and_stored_two_per_byte(tmp_path, symmetric, cols):
    from safetensors import safe_open

    w = torch.randn(5, cols, generator=torch.Generator().manual_seed(cols))
    scheme = QuantScheme(bits=4, group_size=8, symmetric=symmetric)
    q = quantize(w, scheme)
    lo, hi = (-8, 7) if symmetric else (0, 15)
    codes = q.codes
    assert codes.shape == (5, cols) and codes.min() >= lo and codes.max() <= hi
    assert codes.min() == lo or codes.max() == hi  # the full range is used, so sign extension is exercised
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (5, (cols + 1) // 2)
    save_qweights({"x": q}, tmp_path / "q.safetensors")
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        assert f.get_tensor("x.codes").numel() == 5 * ((cols + 1) // 2)
    back = load_qweights(tmp_path / "q.safetensors")["x"]
    assert torch.equal(back.codes, codes) and torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("scheme", [QuantScheme(bits=8, group_size=None, symmetric=True), QuantScheme(bits=4, group_size=32)],
                         ids=lambda s: s.describe())
def test_quantizing_in_row_slices_is_quantizing_whole(scheme):
    w = (torch.randn(37, 96, generator=torch.Generator().manual_seed(5)) * 0.1).to(torch.bfloat16)
    whole = quantize(w, scheme)
    for rows in (5, 37, 8192):
        q = quantize_rows(w, scheme, rows)
        assert torch.equal(q.packed, whole.packed) and torch.equal(q.scales, whole.scales)
        assert (q.zeros is None) == (whole.zeros is None) and (q.zeros is None or torch.equal(q.zeros, whole.zeros))
    seen = []
    clipped = quantize_rows(w, scheme, 16, clip=lambda r: seen.append(len(r)) or torch.full((len(r), 1), 0.9))
    assert seen == [16, 16, 5] and torch.equal(clipped.packed, quantize(w, scheme, clip=torch.full((37, 1), 0.9)).packed)
    with pytest.raises(ValueError, match="K-quant blocks are not quantized in row slices"):
        quantize_rows(w, QuantScheme(layout="Q4_K"), 16)


def test_saving_hands_the_writer_the_held_tensors_not_copies(tmp_path, monkeypatch):
    """A converted copy of every weight's scales used to stay alive for the whole write (0.5 GB at 8B, g32):
    the writer gets the tensors the weights hold, and float offsets as a Cast made only while written."""
    from minicpm_compress import atomic

    w = torch.randn(8, 64)
    sym = quantize(w, QuantScheme(bits=4, group_size=32, symmetric=True))
    offsets = quantize(w, QuantScheme(bits=4, group_size=32, zero_point="float"))
    seen = {}
    real = atomic.save_safetensors
    monkeypatch.setattr(atomic, "save_safetensors", lambda tensors, path, metadata: (seen.update(tensors),
                                                                                    real(tensors, path, metadata)))
    save_qweights({"a": sym, "b": offsets}, tmp_path / "q.safetensors")
    assert seen["a.codes"] is sym.packed and seen["a.scales"] is sym.stored_scales
    assert isinstance(seen["b.zeros"], atomic.Cast) and seen["b.zeros"].tensor is offsets.zeros
    back = load_qweights(tmp_path / "q.safetensors")
    assert torch.equal(back["b"].dequantize(), offsets.dequantize())
    assert torch.equal(back["a"].dequantize(), sym.dequantize())


def test_bfloat16_scales_are_positive_exact_and_still_reach_a_negative_peak_with_code_minus_8():
    from minicpm_compress.export.gguf.blocks import is_lossless

    torch.manual_seed(0)
    w = torch.randn(32, 256) * 0.03
    q = quantize(w, QuantScheme(bits=4, group_size=32, symmetric=True, scale_dtype="bfloat16"))
    s = q.scales
    assert (s > 0).all() and torch.equal(s.to(torch.bfloat16).float(), s) and torch.equal(s.half().float(), s)
    g = w.reshape(32, 8, 32)
    negative_peak = (-g.amin(2)) / 8 >= g.amax(2) / 7  # groups whose reach is set by their most negative weight
    codes = q.codes.reshape(32, 8, 32)
    assert negative_peak.any() and (~negative_peak).any()
    assert (codes.amin(2)[negative_peak] == -8).all() and (codes.amax(2)[~negative_peak] == 7).all()
    assert (q.dequantize() - w).abs().max() <= s.max() * 0.51  # rounding only: nothing clipped beyond half a step
    assert is_lossless(q, "Q4_0")  # bfloat16-exact scales are float16-exact: GGUF carries them as they are
    with pytest.raises(ValueError, match="scale_dtype bfloat16"):
        QuantScheme(layout="Q4_K", scale_dtype="bfloat16")
