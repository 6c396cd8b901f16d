"""Conservation: make every downscaled member reproduce its low-res input when coarsened by block means.

One job: for inputs that *are* block means of the target (the fine grid is the coarse grid refined by an
integer ``scale_factor``, each coarse cell the mean of an ``s x s`` block of fine cells, as in
``glosea4-ts-x4`` and :func:`dpdm_diffusers.data.coarsen`), correct each member so that
``block_mean(member, s) == low_res`` to float precision.

Two corrections (``method``):

* ``"additive"`` (default; temperature, pressure, geopotential, wind components; any signed variable):
  ``x' = x + repeat(low_res - block_mean(x))``, the same offset added to every cell of a block. This is the
  exact L2 (Euclidean) projection of ``x`` onto the fields whose block means equal ``low_res``: the set is an
  affine subspace, and the offset is orthogonal to it. So for any truth whose block means equal the input,
  ``||x' - truth|| <= ||x - truth||`` per block: conservation can only lower the RMSE, never raise it.
* ``"multiplicative"`` (non-negative, skewed variables: precipitation, snowfall, wind speed, humidity):
  ``x' = x * low_res / block_mean(x)`` per block, which keeps zeros dry and values non-negative (an additive
  offset would push dry cells of a wet block below zero or wet every dry cell). Where a block's mean is 0
  (all members' cells dry) it falls back to the additive offset. Not an L2 projection, and it amplifies a
  member's wet cells when the member is much drier than the input; negative ``low_res`` is refused.

Masked cells (NaN) stay NaN and are skipped inside a block (block means average the valid cells, as
:func:`dpdm_diffusers.data.coarsen` does), so the valid cells of a block reproduce the input. Where the
input itself is NaN there is nothing to conserve and the member is left unchanged.

Only apply it when the input is a block mean of the target on a refined grid; a low-res field from another
model (e.g. HadCM3 regridded) is not, and forcing its block means onto the output would be wrong.
:func:`conserve_dataarray` checks the grids from their coordinates.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable

import numpy as np
import torch
import xarray as xr

from .grids import grid_dims, refine

__all__ = ["METHODS", "block_mean", "block_repeat", "conserve", "conserve_dataarray", "check_refinement"]

METHODS = ("additive", "multiplicative")


def _check_factor(s) -> int:
    if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 1:
        raise ValueError(f"scale_factor must be a positive integer, got {s!r}.")
    return int(s)


def _blocks(x, s: int):
    """View ``(..., H, W)`` as ``(..., H/s, s, W/s, s)``; a clear error when H or W is not a multiple of ``s``."""
    s = _check_factor(s)
    h, w = x.shape[-2:]
    if h % s or w % s:
        raise ValueError(f"A {h} x {w} grid is not divisible into {s} x {s} blocks.")
    return x.reshape(*x.shape[:-2], h // s, s, w // s, s)


def block_mean(x, s: int):
    """Mean over ``s x s`` blocks of ``(..., H, W)`` (numpy array or torch tensor) -> ``(..., H/s, W/s)``.

    NaN cells are skipped inside a block; a block with no valid cell is NaN.
    """
    b = _blocks(x, s)
    if isinstance(x, torch.Tensor):
        return torch.nanmean(b, dim=(-3, -1)) if x.is_floating_point() else b.float().mean(dim=(-3, -1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice" for all-NaN blocks
        return np.nanmean(b, axis=(-3, -1))


def block_repeat(x, s: int):
    """Each cell of ``(..., h, w)`` repeated over an ``s x s`` block -> ``(..., h*s, w*s)``."""
    if isinstance(x, torch.Tensor):
        return x.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)
    return np.repeat(np.repeat(x, s, axis=-2), s, axis=-1)


def _check_shapes(fine_shape, coarse_shape, s: int) -> None:
    if len(fine_shape) < 2 or len(coarse_shape) < 2:
        raise ValueError(f"members and low_res need (..., lat, lon) dims, got shapes {tuple(fine_shape)} and {tuple(coarse_shape)}.")
    (H, W), (h, w) = fine_shape[-2:], coarse_shape[-2:]
    if (H, W) != (h * s, w * s):
        raise ValueError(
            f"The members' {H} x {W} grid is not the low-res {h} x {w} grid refined by {s} (expected "
            f"{h * s} x {w * s}); conservation applies only when the fine grid refines the coarse one."
        )
    try:
        np.broadcast_shapes(tuple(fine_shape[:-2]), tuple(coarse_shape[:-2]))
    except ValueError:
        raise ValueError(f"members {tuple(fine_shape)} and low_res {tuple(coarse_shape)} do not broadcast "
                         "in their leading (batch, variable) dims.") from None


def conserve(members, low_res, scale_factor: int, *, method: str = "additive"):
    """Correct ``members`` so that their ``scale_factor`` block means equal ``low_res`` (see the module docs).

    ``members`` ``(..., V, H, W)`` and ``low_res`` ``(..., V, h, w)`` are numpy arrays or torch tensors whose
    leading dims broadcast (e.g. the pipeline's ``(member, batch, V, H, W)`` against ``(batch, V, h, w)``), in
    the same physical units, with ``H = h * scale_factor`` and ``W = w * scale_factor``. Returns the corrected
    members with the type, dtype and device of ``members`` (shape broadcast against ``low_res``).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown conservation method {method!r}; expected one of {METHODS}.")
    s = _check_factor(scale_factor)
    _check_shapes(members.shape, low_res.shape, s)
    is_torch = isinstance(members, torch.Tensor)
    if is_torch:
        low = torch.as_tensor(low_res, device=members.device).to(members.dtype)
    else:
        members = np.asarray(members)
        if not np.issubdtype(members.dtype, np.floating):
            members = members.astype(np.float32)
        low = np.asarray(low_res.detach().cpu() if isinstance(low_res, torch.Tensor) else low_res, dtype=members.dtype)
    lib = torch if is_torch else np
    if method == "multiplicative" and bool((low < 0).any()):
        raise ValueError("Multiplicative conservation is for non-negative variables (e.g. precipitation), but "
                         "low_res has negative values; use method='additive'.")
    mean = block_mean(members, s)
    # no constraint where the input is missing, nothing to correct where the member's block is all missing
    delta = lib.where(lib.isnan(low) | lib.isnan(mean), lib.zeros_like(mean + low), low - mean)
    b = _blocks(members, s)
    if method == "additive":
        out = b + delta[..., :, None, :, None]
    else:
        wet = mean != 0
        safe = lib.where(wet, mean, lib.ones_like(mean))
        ratio = lib.where(wet, (mean + delta) / safe, lib.ones_like(mean))
        offset = lib.where(wet, lib.zeros_like(delta), delta)  # a dry block (mean 0) cannot be scaled
        out = b * ratio[..., :, None, :, None] + offset[..., :, None, :, None]
    return out.reshape(*out.shape[:-4], out.shape[-4] * s, out.shape[-2] * s)


def check_refinement(fine: xr.DataArray | xr.Dataset, coarse: xr.DataArray | xr.Dataset, scale_factor: int,
                     rtol: float = 0.01) -> None:
    """Refuse a fine grid whose lat/lon centres are not the coarse grid's cells split ``scale_factor`` ways.

    ``rtol`` is the tolerance as a fraction of the fine grid spacing; longitudes are compared modulo 360.
    """
    s = _check_factor(scale_factor)
    for (fn, cn), what in zip(zip(grid_dims(fine), grid_dims(coarse)), ("latitude", "longitude")):
        f = np.asarray(fine[fn].values, dtype=np.float64)
        c = np.asarray(coarse[cn].values, dtype=np.float64)
        if f.size != c.size * s:
            raise ValueError(f"The fine {what} axis has {f.size} points, not {s} x the coarse {c.size}: "
                             "the fine grid is not a refinement of the coarse one.")
        want = refine(c, s) if c.size > 1 else f  # one coarse cell: no spacing to refine with, sizes checked
        d = f - want
        if what == "longitude":
            d = (d + 180.0) % 360.0 - 180.0
        step = abs(float(np.median(np.diff(f)))) if f.size > 1 else 1.0
        if np.max(np.abs(d)) > rtol * step:
            i = int(np.argmax(np.abs(d)))
            raise ValueError(
                f"The fine {what}s are not the centres of the coarse cells split {s} ways (e.g. {f[i]:.6g} vs "
                f"{want[i]:.6g}, off by {abs(d[i]):.3g} of a {step:.3g} spacing): misaligned grids, refusing to conserve."
            )


def conserve_dataarray(members: xr.DataArray | xr.Dataset, low_res: xr.DataArray | xr.Dataset, scale_factor: int,
                       *, method: str = "additive") -> xr.DataArray | xr.Dataset:
    """:func:`conserve` for xarray: dims matched by name, lat/lon found by :func:`grids.lat_lon_names`.

    ``members`` may carry dims ``low_res`` lacks (``member``); shared dims must have identical coordinates.
    The grids are checked with :func:`check_refinement` first, so a misaligned or non-refined grid raises
    instead of being corrected wrongly. Datasets are corrected variable by variable. Keeps ``members``' dim
    order, coordinates and attributes.
    """
    if isinstance(members, xr.Dataset):
        return members.assign({k: conserve_dataarray(members[k], low_res[k], scale_factor, method=method)
                               for k in members.data_vars})
    check_refinement(members, low_res, scale_factor)
    la, lo = grid_dims(members)
    cla, clo = grid_dims(low_res)
    core: tuple[Hashable, Hashable] = ("_coarse_lat", "_coarse_lon")
    low = low_res.rename({cla: core[0], clo: core[1]}).drop_vars(core, errors="ignore")
    out = xr.apply_ufunc(
        conserve, members, low, scale_factor,
        input_core_dims=[[la, lo], list(core), []], output_core_dims=[[la, lo]],
        kwargs={"method": method}, join="exact", keep_attrs=True, dask="parallelized",
        output_dtypes=[members.dtype],
    )
    return out.transpose(*members.dims, ...)
