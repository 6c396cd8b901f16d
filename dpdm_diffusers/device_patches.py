"""Random training patches cut on the training device, a whole batch per call.

One job: the GPU-fed counterpart of :class:`dpdm_diffusers.samples.RandomPatchDataset`.

Why: a DataLoader builds every patch in Python on the CPU (one ``__getitem__`` per patch, then a collate and a
host-to-device copy). On one H100 that capped the fast preset at about 0.6x a bare forward + backward + AdamW
loop (issue #14). The fields of a region rarely exceed a few GB, so they are put on the device once and a
batch becomes three index draws and one gather per tensor, with no host round trip.

The crops of training step ``s`` on process ``r`` are a pure function of ``(seed, r, s)``: a resumed run draws
exactly what an uninterrupted one would, without replaying a loader. The draws are not the DataLoader's
(a different random stream), only the same distribution: uniform sample, row and (wrapping, when the
longitude is global) column; the same flips, sign handling of vector components and redraws of
mostly-invalid patches.
"""

from __future__ import annotations

import numpy as np
import torch

from .samples import NormalizedFields, RandomPatchDataset

__all__ = ["DevicePatchSampler", "fits_on_device"]


def fits_on_device(fields, device, fraction: float = 0.25) -> bool:
    """Whether ``fields`` (in memory) can live on ``device`` using at most ``fraction`` of its free memory.

    Memory-mapped Arrow stores never do: they exist for data larger than memory."""
    if not isinstance(fields, NormalizedFields):
        return False
    nbytes = (fields.target.size * 5 + fields.lerp.size * 5 + fields.static.size * 4)  # float32 + bool masks
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= fraction * free
    return True  # on the CPU the NaN-free copies and masks are about twice the fields: the same order as the fields


class DevicePatchSampler:
    """Batches of random ``patch_size`` crops drawn on ``device``.

    Build it from the :class:`RandomPatchDataset` the DataLoader would have used, so both share one set of
    checks (patch size, padding of small domains, vector components)::

        sampler = DevicePatchSampler(dataset, batch_size=64, device="cuda", process_index=rank)
        batch = sampler.batch(step)  # {"target", "condition", "mask", "sample", "y", "x"} on the device

    The batch has the DataLoader's keys, shapes and dtypes: ``target`` (B, V, p, p) with 0 where invalid
    (missing, or outside the fields' ``loss_mask``),
    ``condition`` (B, V + S, p, p), ``mask`` (B, V, p, p) bool, ``sample``/``y``/``x`` (B,) int64.
    """

    def __init__(self, dataset: RandomPatchDataset, batch_size: int, device, process_index: int = 0):
        fields = dataset.fields
        if not isinstance(fields, NormalizedFields):
            raise TypeError("DevicePatchSampler needs fields in memory (NormalizedFields); stream an Arrow store "
                            "through the DataLoader instead.")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.patch_size = dataset.patch_size
        self.periodic = bool(fields.periodic)
        self.flips = dataset.flips
        self.min_valid_fraction = dataset.min_valid_fraction
        self.max_tries = dataset.max_tries if self.min_valid_fraction > 0 else 1
        self.seed, self.process_index = int(dataset.seed), int(process_index)
        self.full = fields.normalizer.prediction == "full"
        self._signs = {axis: list(ch) for axis, ch in dataset._signs.items() if ch}
        self._shift = dict(dataset._shift)

        def put(a, dtype=torch.float32):
            return torch.as_tensor(np.ascontiguousarray(a)).to(self.device, dtype)

        target, lerp = fields.target, fields.lerp
        valid = np.isfinite(target)
        if fields.loss_mask is not None:  # e.g. a validation box: real data, never learnt from
            valid &= fields.loss_mask
        self.mask = put(valid, torch.bool)
        # zero where invalid, as the DataLoader's patches: a masked value would still reach the UNet's input
        self.target = put(np.where(valid, target, 0.0))
        self.lerp_valid = put(np.isfinite(lerp), torch.bool)
        self.lerp = put(np.nan_to_num(lerp, nan=0.0))
        self.static = put(fields.static)
        self.num_samples, self.num_vars = int(target.shape[0]), int(target.shape[1])
        self.ny, self.nx = fields.shape
        self._arange = torch.arange(self.patch_size, device=self.device)

    def _generator(self, step: int) -> torch.Generator:
        # one 63-bit seed per (seed, process, step): numpy's SeedSequence mixes the three
        key = np.random.SeedSequence((self.seed, self.process_index, int(step))).generate_state(2, np.uint64)
        return torch.Generator(device=self.device).manual_seed(int(key[0] >> np.uint64(1)))

    def _draw(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, dev = self.patch_size, self.device
        sample = torch.randint(0, self.num_samples, (n,), generator=gen, device=dev)
        y0 = torch.randint(0, self.ny - p + 1, (n,), generator=gen, device=dev)
        x0 = torch.randint(0, self.nx if self.periodic else self.nx - p + 1, (n,), generator=gen, device=dev)
        return sample, y0, x0

    def _gather(self, a: torch.Tensor, sample, rows, cols) -> torch.Tensor:
        """(B, C, p, p) crops of ``a`` (N, C, H, W) or, with ``sample=None``, of ``a`` (C, H, W)."""
        ch = torch.arange(a.shape[-3], device=self.device)[None, :, None, None]
        r, c = rows[:, None, :, None], cols[:, None, None, :]
        if sample is None:
            return a[ch, r, c]
        return a[sample[:, None, None, None], ch, r, c]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of training (micro-)step ``step`` on this process."""
        gen = self._generator(step)
        b, tries = self.batch_size, self.max_tries
        sample, y0, x0 = self._draw(gen, b * tries)
        if tries > 1:  # redraw mostly-invalid patches: keep each sample's first good try, else its last
            rows = y0[:, None] + self._arange
            cols = (x0[:, None] + self._arange) % self.nx
            frac = self._gather(self.mask, sample, rows, cols).float().mean(dim=(1, 2, 3)).view(tries, b)
            good = frac >= self.min_valid_fraction
            last = torch.full_like(good[0], tries - 1, dtype=torch.long)
            first = torch.where(good.any(0), good.float().argmax(0), last)
            pick = first * b + torch.arange(b, device=self.device)
            sample, y0, x0 = sample[pick], y0[pick], x0[pick]
        else:
            sample, y0, x0 = sample[:b], y0[:b], x0[:b]
        rows = y0[:, None] + self._arange
        cols = (x0[:, None] + self._arange) % self.nx
        flipped = {}
        for axis in self.flips:  # a mirror is a reversed index order: no copy of the data
            flip = torch.rand(b, generator=gen, device=self.device) < 0.5
            flipped[axis] = flip
            if axis == "lon":
                cols = torch.where(flip[:, None], cols.flip(-1), cols)
            else:
                rows = torch.where(flip[:, None], rows.flip(-1), rows)
        target = self._gather(self.target, sample, rows, cols)
        mask = self._gather(self.mask, sample, rows, cols)
        lerp = self._gather(self.lerp, sample, rows, cols)
        static = self._gather(self.static, None, rows, cols)
        for axis, channels in self._signs.items():  # sign of vector components under a mirror, in model space
            flip = flipped.get(axis)
            if flip is None:
                continue
            lerp_ok = self._gather(self.lerp_valid, sample, rows, cols)
            for k in channels:
                f = flip[:, None, None]
                shift = self._shift[k]
                lerp[:, k] = torch.where(f & lerp_ok[:, k], -lerp[:, k] - shift, lerp[:, k])
                new_t = -target[:, k] - shift if self.full else -target[:, k]
                target[:, k] = torch.where(f & mask[:, k], new_t, target[:, k])
        return {
            "target": target,
            "condition": torch.cat([lerp, static], dim=1),
            "mask": mask,
            "sample": sample,
            "y": y0,
            "x": x0,
        }
