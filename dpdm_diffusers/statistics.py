"""Per-variable normalisation statistics, computed on the training split only.

One job: reduce lazily opened (dask) training data to the handful of numbers the pipeline config
stores, with the same transforms as :mod:`dpdm_diffusers.transforms`. The returned dict uses exactly the
config keys (``variables``, ``units``, ``transforms``, ``norm_mean``, ``norm_std``, ``residual_std``,
``static_channels``, ``static_mean``, ``static_std``), so it can go straight into
``pipe.register_to_config(**stats)`` or :meth:`Normalizer.from_config`.

Statistics are *per variable*, pooled over every valid grid point and time step (not per grid point), so
a model transfers to other grids and regions. They are not area-weighted on purpose: training draws
patches uniformly over grid points, and the statistics should describe what the model sees.
Missing values (NaN, e.g. the ocean in ERA5-Land, or points excluded by ``mask``) are ignored, never
counted as zeros.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from .transforms import forward_transform

__all__ = ["default_transform", "compute_statistics", "static_statistics"]

# Non-negative, heavy-tailed fields get log1p (the paper's log transform for TP).
_PRECIP_NAMES = re.compile(
    r"^(tp|pr|prate|precip|precipitation|total_precipitation|rain|rainfall|snowfall|sf|cp|lsp|mtpr|apcp)(_.*)?$",
    re.IGNORECASE,
)
_PRECIP_STANDARD = ("precipitation", "rainfall", "snowfall")


def default_transform(name: str, attrs: Mapping[str, Any] | None = None) -> str:
    """``"log1p"`` for precipitation-like variables (by name or CF ``standard_name``), else ``"identity"``."""
    attrs = attrs or {}
    standard = str(attrs.get("standard_name", "")).lower()
    if _PRECIP_NAMES.match(str(name)) or any(k in standard for k in _PRECIP_STANDARD):
        return "log1p"
    return "identity"


def _resolve_transforms(ds: xr.Dataset, variables: Sequence[str], transforms) -> list[str]:
    if transforms is None:
        return [default_transform(v, ds[v].attrs) for v in variables]
    if isinstance(transforms, str):
        return [transforms] * len(variables)
    if isinstance(transforms, Mapping):
        return [transforms.get(v) or default_transform(v, ds[v].attrs) for v in variables]
    transforms = list(transforms)
    if len(transforms) != len(variables):
        raise ValueError(f"{len(transforms)} transforms for {len(variables)} variables {list(variables)}.")
    return transforms


def static_statistics(static: xr.Dataset, channels: Sequence[str] | None = None) -> dict:
    """Spatial mean/std of each static channel (NaN ignored) as ``static_channels/static_mean/static_std``.

    A constant channel (e.g. the land fraction of an all-land region) gets ``std = 1`` so normalisation
    only removes the mean instead of dividing by zero.
    """
    channels = list(channels) if channels is not None else list(map(str, static.data_vars))
    missing = [c for c in channels if c not in static.data_vars]
    if missing:
        raise KeyError(f"Static fields lack channels {missing}; they hold {sorted(map(str, static.data_vars))}.")
    values = xr.Dataset(
        {f"{c}__mean": static[c].astype(np.float64).mean() for c in channels}
        | {f"{c}__std": static[c].astype(np.float64).std() for c in channels}
    ).compute()
    means, stds = [], []
    for c in channels:
        m, s = float(values[f"{c}__mean"]), float(values[f"{c}__std"])
        if not np.isfinite(m):
            raise ValueError(f"Static channel {c!r} has no valid values.")
        if not s > 1e-6 * max(1.0, abs(m)):
            s = 1.0
        means.append(m)
        stds.append(s)
    return {"static_channels": channels, "static_mean": means, "static_std": stds}


def compute_statistics(
    high_res: xr.Dataset,
    lerp: xr.Dataset,
    *,
    variables: Sequence[str] | None = None,
    transforms: Sequence[str] | Mapping[str, str] | str | None = None,
    train: Mapping[str, Any] | None = None,
    mask: xr.DataArray | None = None,
    static: xr.Dataset | None = None,
    static_channels: Sequence[str] | None = None,
) -> dict:
    """Normalisation statistics of the training split, keyed like the pipeline config.

    Parameters
    ----------
    high_res
        Target fields in physical units, dims ``(..., lat, lon)`` (lazy is fine: one dask pass).
    lerp
        The low-res interpolated to the same grid (``PairedData.lerp()``), same variables and dims.
    variables
        Variables in config order; default: all data variables of ``high_res``.
    transforms
        ``"identity"``/``"log1p"``/``"sqrt"`` per variable (list, mapping or one string); default by name
        (:func:`default_transform`: log1p for precipitation).
    train
        Selection of the training split passed to ``.sel`` on both datasets, e.g.
        ``{"time": slice("1979", "2015")}``. Nothing outside it influences the statistics.
    mask
        Optional boolean DataArray (True = use) broadcastable to the fields, e.g. a land mask.
    static, static_channels
        Static fields on the target grid (``get_static_fields``); adds ``static_mean``/``static_std``.

    Returns
    -------
    dict
        ``variables, units, transforms, norm_mean, norm_std, residual_std`` and, with ``static``,
        ``static_channels, static_mean, static_std`` (plain Python lists, JSON-serialisable).
        ``residual_std`` is the std of ``normalised(high_res) - normalised(lerp)`` over points valid in both.
    """
    variables = list(variables) if variables is not None else list(map(str, high_res.data_vars))
    for name, ds in (("high_res", high_res), ("lerp", lerp)):
        missing = [v for v in variables if v not in ds.data_vars]
        if missing:
            raise KeyError(f"`{name}` lacks variables {missing}; it holds {sorted(map(str, ds.data_vars))}.")
    transforms = _resolve_transforms(high_res, variables, transforms)
    if train is not None:
        high_res, lerp = high_res.sel(**train), lerp.sel(**train)
        if mask is not None:
            mask = mask.sel(**{k: v for k, v in train.items() if k in mask.dims})

    # First pass: mean/std of the transformed high-res (both moments from one dask graph).
    lazy = {}
    for v, t in zip(variables, transforms):
        h = forward_transform(high_res[v].astype(np.float64), t)  # lazily on dask-backed data
        l = forward_transform(lerp[v].astype(np.float64), t)
        if mask is not None:
            h = h.where(mask)
        lazy[f"{v}__mean"] = h.mean()
        lazy[f"{v}__std"] = h.std()
        # residual in transformed units; dividing by norm_std later gives the normalised residual
        lazy[f"{v}__res"] = (h - l).std()
        lazy[f"{v}__count"] = h.count()
    with warnings.catch_warnings():  # all-NaN variables are reported below with a clear error
        warnings.simplefilter("ignore", RuntimeWarning)
        stats = xr.Dataset(lazy).compute()

    means, stds, res = [], [], []
    for v in variables:
        count = int(stats[f"{v}__count"])
        if count == 0:
            raise ValueError(f"Variable {v!r} has no valid values in the training split.")
        m, s, r = (float(stats[f"{v}__{k}"]) for k in ("mean", "std", "res"))
        if not s > 0:
            raise ValueError(f"Variable {v!r} is constant over the training split (std 0); cannot normalise.")
        if not np.isfinite(r) or r <= 0:
            warnings.warn(f"Residual of {v!r} is zero or undefined; using residual_std = 1.", stacklevel=2)
            r = s
        means.append(m)
        stds.append(s)
        res.append(r / s)
    out = {
        "variables": variables,
        "units": [str(high_res[v].attrs.get("units", "")) for v in variables],
        "transforms": transforms,
        "norm_mean": means,
        "norm_std": stds,
        "residual_std": res,
    }
    if static is not None:
        out.update(static_statistics(static, static_channels))
    return out
