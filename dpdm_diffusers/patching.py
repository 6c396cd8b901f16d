"""Overlapping square tiles over a 2-D canvas, fused with smooth weights.

Pure tensor math, no I/O. The pipeline keeps the whole (padded) domain as one canvas, cuts it into
tiles of the model's patch size for each UNet call and fuses the tile predictions back onto the
canvas at *every* denoising step (multi-diffusion). Because every step sees a single consistent
field there are no seams, unlike averaging independently sampled tiles once at the end.

Tiles are stored as flat pixel indices into the canvas, so a periodic (global) longitude axis is just
an index modulo the width: tiles may wrap across the seam and the field is continuous there too.
"""

from __future__ import annotations

import math

import torch


def tile_starts(size: int, patch: int, overlap: int, periodic: bool = False) -> list[int]:
    """Start offsets of tiles covering an axis of ``size`` pixels with at least ``overlap`` overlap.

    Non-periodic axes need ``size >= patch`` (pad first); starts are spread evenly from 0 to
    ``size - patch`` so every overlap is about the same. Periodic axes are covered cyclically.
    """
    if patch < 1 or not 0 <= overlap < patch:
        raise ValueError(f"Need 0 <= overlap < patch, got overlap={overlap}, patch={patch}.")
    stride = patch - overlap
    if periodic and size > patch:
        n = math.ceil(size / stride)
        return [round(i * size / n) for i in range(n)]
    if size < patch:
        raise ValueError(f"Axis of {size} px is smaller than the patch ({patch} px); pad it first.")
    if size == patch:
        return [0]
    n = math.ceil((size - patch) / stride) + 1
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


def blend_window(patch: int, overlap: int, floor: float = 1e-3) -> torch.Tensor:
    """1-D weights: 1 in the middle, a raised-cosine ramp over ``overlap`` px at each end.

    The small floor keeps pixels covered by a single tile's edge (canvas borders) well defined.
    """
    w = torch.ones(patch, dtype=torch.float64)
    if overlap > 0:
        i = torch.arange(overlap, dtype=torch.float64)
        ramp = torch.sin(0.5 * math.pi * (i + 0.5) / overlap) ** 2
        w[:overlap] = ramp
        w[patch - overlap:] = ramp.flip(0)
    return w.clamp_min(floor)


class PatchTiler:
    """Cut a ``(H, W)`` canvas into ``patch x patch`` tiles and fuse tile outputs back.

    Args:
        height, width: canvas size (each >= ``patch``, except a periodic width may be anything >= 1).
        patch: tile size in pixels.
        overlap: minimum overlap between neighbouring tiles in pixels (default ``patch // 4``).
        periodic_x: whether the last axis wraps around (global longitude).
    """

    def __init__(self, height: int, width: int, patch: int, overlap: int | None = None, periodic_x: bool = False):
        self.height, self.width, self.patch = height, width, patch
        self.overlap = patch // 4 if overlap is None else overlap
        self.periodic_x = periodic_x and width > patch
        ys = tile_starts(height, patch, self.overlap)
        xs = tile_starts(width, patch, self.overlap, periodic=self.periodic_x)
        self.starts = [(y, x) for y in ys for x in xs]
        ar = torch.arange(patch)
        rows = torch.stack([y + ar for y, _ in self.starts])  # (N, P)
        cols = torch.stack([(x + ar) % width for _, x in self.starts])  # (N, P)
        # flat pixel index of every tile pixel, (N, P*P)
        self.index = (rows[:, :, None] * width + cols[:, None, :]).reshape(len(self.starts), -1)
        w1 = blend_window(patch, self.overlap)
        self.window = (w1[:, None] * w1[None, :]).reshape(-1).float()  # (P*P,)
        wsum = torch.zeros(height * width, dtype=torch.float64)
        wsum.index_add_(0, self.index.reshape(-1), self.window.double().repeat(len(self.starts)))
        if (wsum <= 0).any():
            raise RuntimeError("Tiling leaves pixels uncovered; this is a bug.")
        self.weight_sum = wsum.float()  # (H*W,)

    @property
    def num_tiles(self) -> int:
        return len(self.starts)

    def extract(self, canvas: torch.Tensor, rows: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        """Gather tiles ``tiles[i]`` from canvas rows ``rows[i]``.

        ``canvas`` is ``(R, C, H, W)``; returns ``(n, C, P, P)`` for ``n = len(rows)``.
        """
        r, c, h, w = canvas.shape
        flat = canvas.reshape(r, c, h * w)
        idx = self.index.to(canvas.device)[tiles.to(canvas.device)]  # (n, P*P)
        out = flat[rows.to(canvas.device)[:, None, None], torch.arange(c, device=canvas.device)[None, :, None], idx[:, None, :]]
        return out.reshape(len(rows), c, self.patch, self.patch)

    def accumulate(self, acc: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, tiles: torch.Tensor) -> None:
        """Add window-weighted tile ``values`` ``(n, C, P, P)`` into ``acc`` ``(R, C, H*W)`` in place."""
        r, c, hw = acc.shape
        idx = self.index.to(acc.device)[tiles.to(acc.device)]  # (n, P*P)
        flat_idx = (rows.to(acc.device)[:, None, None] * c + torch.arange(c, device=acc.device)[None, :, None]) * hw + idx[:, None, :]
        weighted = values.reshape(len(rows), c, -1).to(acc.dtype) * self.window.to(acc.device, acc.dtype)
        acc.view(-1).index_add_(0, flat_idx.reshape(-1), weighted.reshape(-1))

    def normalize(self, acc: torch.Tensor) -> torch.Tensor:
        """Divide an accumulator ``(R, C, H*W)`` by the summed weights; returns ``(R, C, H, W)``."""
        out = acc / self.weight_sum.to(acc.device, acc.dtype)
        return out.reshape(acc.shape[0], acc.shape[1], self.height, self.width)

    def fuse(self, values: torch.Tensor, rows: torch.Tensor, tiles: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Fuse tile values ``(n, C, P, P)`` into canvases ``(num_rows, C, H, W)`` (every pixel must be covered)."""
        acc = values.new_zeros(num_rows, values.shape[1], self.height * self.width, dtype=torch.float32)
        self.accumulate(acc, values, rows, tiles)
        return self.normalize(acc)
