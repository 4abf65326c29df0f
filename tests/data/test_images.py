"""MiniCPM-V preprocessing: slice grids, sizes and normalisation as the reference processor computes them,
and the built-in image sets."""

import numpy as np
import pytest

from minicpm_compress.data.images import HELDOUT_SIDE, best_resize, preprocess, read_images, refine_size, sliced_grid
from minicpm_compress.errors import CompressError


@pytest.mark.parametrize("size, grid", [
    ((448, 448), None),  # one piece
    ((300, 451), None),
    ((512, 512), (1, 2)),  # 1.3 × 448²: two pieces; a square ties (1, 2) and (2, 1), the first candidate wins
    ((600, 400), (2, 1)),  # wide: two columns
    ((1000, 1000), (2, 2)),
    ((1344, 448), (3, 1)),
    ((448, 4000), (1, 9)),  # capped at max_slice_nums
])
def test_slice_grid(size, grid):
    assert sliced_grid(size, 448, 9) == grid


def test_sizes_are_multiples_of_the_patch_near_the_target_area():
    assert best_resize((512, 512), 448, 14, allow_upscale=True) == (448, 448)
    assert best_resize((451, 300), 448, 14, allow_upscale=True) == (546, 364)  # upscaled to ~448² area
    assert best_resize((600, 400), 448, 14) == (546, 364)  # int(448 / √1.5) = 365 → 364; int(365 · 1.5) = 547 → 546
    assert best_resize((100, 80), 448, 14) == (98, 84)  # not upscaled unless asked
    assert refine_size((600, 400), (2, 1), 448, 14) == (784, 518)  # two 392 × 518 slices


def test_preprocess_pieces_and_normalisation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
    out = preprocess(image)
    assert out.grid == (2, 1)
    assert [tuple(p.shape) for p in out.pieces] == [(3, 364, 546), (3, 518, 392), (3, 518, 392)]
    assert all(p.min() >= -1 and p.max() <= 1 for p in out.pieces)
    exact = preprocess(np.full((448, 448, 3), 255, dtype=np.uint8))  # no resize at the target size: exact values
    assert exact.grid is None and float(exact.pieces[0].min()) == 1.0
    assert preprocess(image, slice_mode=False).grid is None


def test_builtin_sets_and_folders(tmp_path):
    held = read_images("skimage-heldout")
    calib = read_images("skimage-calib")
    assert {n for n, _ in held}.isdisjoint(n for n, _ in calib)
    assert all(a.shape == (HELDOUT_SIDE, HELDOUT_SIDE, 3) and a.dtype == np.uint8 for _, a in held)
    assert max(max(a.shape[:2]) for _, a in calib) <= 1000
    with pytest.raises(CompressError, match="no .png/.jpg images"):
        read_images(str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CompressError, match="broken.png: not a readable image"):
        read_images(str(tmp_path))
