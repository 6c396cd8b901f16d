"""PatchTiler: coverage, exact fuse/extract round trip, smooth weights, periodic wrap."""

import numpy as np
import pytest
import torch

from dpdm_diffusers.patching import PatchTiler, blend_window, tile_starts


@pytest.mark.parametrize("size, patch, overlap", [(16, 16, 4), (40, 16, 4), (57, 16, 0), (100, 32, 8)])
def test_tile_starts_cover_the_axis_with_at_least_the_overlap(size, patch, overlap):
    starts = tile_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == size - patch
    gaps = np.diff(starts)
    assert (gaps <= patch - overlap).all() and (gaps > 0).all()


def test_periodic_starts_wrap_evenly():
    starts = tile_starts(50, 16, 4, periodic=True)
    assert starts[0] == 0 and max(starts) < 50
    gaps = np.diff(starts + [50])
    assert (gaps <= 12).all()


def test_too_small_axis_or_bad_overlap_is_refused():
    with pytest.raises(ValueError, match="smaller than the patch"):
        tile_starts(10, 16, 4)
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(40, 16, 16)


def test_blend_window_is_smooth_and_positive():
    w = blend_window(16, 4)
    assert (w > 0).all() and w.max() == 1 and torch.allclose(w, w.flip(0))
    assert (torch.diff(w[:4]) > 0).all()


@pytest.mark.parametrize("periodic", [False, True])
def test_fuse_of_extracted_tiles_reproduces_the_canvas(periodic):
    canvas = torch.randn(3, 2, 24, 40)
    t = PatchTiler(24, 40, 16, 4, periodic_x=periodic)
    rows = torch.arange(3).repeat_interleave(t.num_tiles)
    tiles = torch.arange(t.num_tiles).repeat(3)
    patches = t.extract(canvas, rows, tiles)
    assert patches.shape == (3 * t.num_tiles, 2, 16, 16)
    torch.testing.assert_close(t.fuse(patches, rows, tiles, 3), canvas)


def test_extract_reads_the_right_pixels_and_wraps():
    canvas = torch.arange(24 * 40, dtype=torch.float32).view(1, 1, 24, 40)
    t = PatchTiler(24, 40, 16, 4, periodic_x=True)
    for j, (y, x) in enumerate(t.starts):
        tile = t.extract(canvas, torch.tensor([0]), torch.tensor([j]))[0, 0]
        cols = (x + np.arange(16)) % 40
        np.testing.assert_array_equal(tile.numpy(), canvas[0, 0].numpy()[y : y + 16][:, cols])
    assert any(x + 16 > 40 for _, x in t.starts)  # some tile crosses the seam


def test_weights_blend_two_constant_tiles_smoothly():
    t = PatchTiler(16, 28, 16, 4)
    assert t.num_tiles == 2
    vals = torch.stack([torch.zeros(1, 16, 16), torch.ones(1, 16, 16)])
    fused = t.fuse(vals, torch.tensor([0, 0]), torch.tensor([0, 1]), 1)[0, 0, 0]
    assert fused[0] == 0 and fused[-1] == 1
    assert (torch.diff(fused) >= -1e-6).all()  # monotone ramp, no jump
    assert torch.diff(fused).max() < 0.5
