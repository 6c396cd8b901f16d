"""Verification metrics for downscaled fields and ensembles: small pure functions over xarray.

Style follows weatherbench2: every metric is a function of ``(forecast, truth, ...)`` returning an
``xr.DataArray`` (a 0-d array when everything is reduced). Nothing here imports the pipeline: the
functions take arrays, so they score any method (Lerp, a deterministic UNet, DPDM members).

Conventions shared by every function
------------------------------------
* ``truth`` has dims ``(time, lat, lon)`` (or ``sample`` instead of ``time``, or no sample dim);
  ``forecast`` has the same dims, plus ``member`` (``members_dim``) for ensembles. The coordinates
  of both must match exactly (``xr.align(join="exact")``): a silent inner join on slightly different
  float coordinates would drop points, so a mismatch raises instead.
* Latitude/longitude dims are found by name (``lat``/``latitude``/... see :mod:`dpdm_diffusers.grids`).
* **Masked points are NaN** and are excluded everywhere: a point counts only where the truth and the
  forecast (all members, for ensemble scores) are finite; means are taken over the valid points only.
* ``dims`` names the dims to reduce. ``None`` means every dim of ``truth`` (so a ``member`` dim the
  truth lacks is kept: ``rmse(members, truth)`` gives one RMSE per member). Field-wise metrics
  (ACC, SSIM, PSNR, power spectrum) work per 2-D ``(lat, lon)`` field first; their ``dims`` then
  names the *other* dims to average the per-field scores over.
* ``area_weighted=False`` by default, matching the paper (plain grid-point means on its regular
  0.1 deg regional grid). ``area_weighted=True`` weights each point by ``cos(lat)``, the right choice
  for global grids where a grid cell's area shrinks poleward: ``mean_w(x) = sum(w x) / sum(w)`` over
  valid points with ``w = cos(lat)``. SSIM/PSNR and the power spectrum are image metrics and are
  never area-weighted.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import xarray as xr

from .grids import Grid, area_weights, grid_dims, lat_lon_names
from .native_grids import box_slices, native_axes

Dims = Hashable | Sequence[Hashable] | None

__all__ = [
    "Box",
    "REGIONS",
    "select_region",
    "rmse",
    "mse",
    "mae",
    "bias",
    "sample_climatology",
    "acc",
    "ssim",
    "psnr",
    "crps",
    "spread_skill_ratio",
    "rank_histogram",
    "reliability_index",
    "outside_fraction",
    "power_spectrum",
    "score_table",
    "to_markdown",
    "DEFAULT_METRICS",
]


# ---------------------------------------------------------------------------------------------------
# Regions
# ---------------------------------------------------------------------------------------------------
class Box(NamedTuple):
    """A lat/lon box in degrees. Longitudes run west -> east from ``lon_min`` to ``lon_max`` in either
    convention (``-100, -80`` and ``260, 280`` are the same box; ``350, 10`` crosses the meridian)."""

    lon_min: float
    lon_max: float
    lat_min: float
    lat_max: float


#: Evaluation regions of the paper and of the ``glosea4-ts-x4`` benchmark (``None`` = whole domain).
REGIONS: dict[str, Box | None] = {
    "global": None,
    "east_asia": Box(100.0, 150.0, 10.0, 55.0),  # 100-150E, 10-55N
    "gulf_coast": Box(-100.0, -80.0, 20.0, 35.0),  # 100-80W, 20-35N
    "northern_australia": Box(120.0, 150.0, -20.0, -10.0),  # 120-150E, 20-10S
}


def select_region(obj, region: str | Box | tuple | None):
    """Crop ``obj`` (xr.DataArray or Dataset) to a region, inclusive of the box edges.

    ``region`` is a name in :data:`REGIONS`, a :class:`Box` / 4-tuple ``(lon_min, lon_max, lat_min,
    lat_max)``, or ``None``/``"global"`` for the whole object. Works for longitudes in 0..360 or
    -180..180 (the box is matched modulo 360) and for ascending or descending latitude (the
    latitude order is kept). A box that crosses the grid's longitude seam (e.g. 350..10 on a 0..360
    grid) is returned contiguous, west to east.
    """
    if isinstance(region, str):
        if region not in REGIONS:
            raise KeyError(f"Unknown region {region!r}; known: {sorted(REGIONS)} (or pass a Box).")
        region = REGIONS[region]
    if region is None:
        return obj
    lon_min, lon_max, lat_min, lat_max = (float(v) for v in region)
    if lat_min > lat_max:
        raise ValueError(f"Box latitudes must satisfy lat_min <= lat_max, got {lat_min}, {lat_max}.")
    axes = native_axes(obj)
    if axes is not None:  # a rotated or projected grid: the cells whose centres lie in the box
        grid = Grid(obj[axes.y].values, obj[axes.x].values, axes.mapping)
        rows, cols = box_slices(*grid.geographic(), (lat_min, lat_max), (lon_min, lon_max))
        return obj.isel({axes.y: rows, axes.x: cols})
    la, lo = lat_lon_names(obj)
    lat = np.asarray(obj[la].values, dtype=np.float64)
    lon = np.asarray(obj[lo].values, dtype=np.float64)
    eps = 1e-6
    lat_idx = np.nonzero((lat >= lat_min - eps) & (lat <= lat_max + eps))[0]

    if lon_max - lon_min >= 360.0 - eps:
        lon_idx = np.arange(lon.size)
    else:
        width = (lon_max - lon_min) % 360.0
        offset = (lon - lon_min) % 360.0  # distance east of the box's western edge
        offset = np.where(offset > 360.0 - eps, 0.0, offset)
        sel = offset <= width + eps
        lon_idx = np.nonzero(sel)[0]
        lon_idx = lon_idx[np.argsort(offset[lon_idx], kind="stable")]  # west -> east, contiguous
        if lon.size > 1 and lon[0] > lon[-1]:  # keep a descending grid descending
            lon_idx = lon_idx[::-1]
    if lat_idx.size == 0 or lon_idx.size == 0:
        raise ValueError(
            f"Region {tuple(region)} selects no points from lat [{lat.min()}, {lat.max()}], "
            f"lon [{lon.min()}, {lon.max()}]."
        )
    return obj.isel({la: lat_idx, lo: lon_idx})


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def _align(forecast: xr.DataArray, truth: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    # Float coordinates that agree to 1e-4 (e.g. float32 vs float64 latitudes) are taken as equal.
    fix = {}
    for d in set(forecast.dims) & set(truth.dims):
        if d in forecast.coords and d in truth.coords and forecast.sizes[d] == truth.sizes[d]:
            a, b = forecast[d].values, truth[d].values
            if (
                np.issubdtype(a.dtype, np.floating)
                and np.issubdtype(b.dtype, np.floating)
                and not np.array_equal(a, b)
                and np.allclose(a, b, rtol=0.0, atol=1e-4)
            ):
                fix[d] = b
    if fix:
        forecast = forecast.assign_coords(fix)
    try:
        return xr.align(forecast, truth, join="exact")
    except ValueError as e:  # pragma: no cover - message only
        raise ValueError(
            "forecast and truth coordinates differ; regrid or assign identical coordinates first "
            f"(xarray: {e})"
        ) from None


def _as_list(dims: Dims, default: Iterable[Hashable]) -> list[Hashable]:
    if dims is None:
        return list(default)
    if isinstance(dims, str) or not isinstance(dims, Iterable):
        return [dims]
    return list(dims)


def _weights(obj: xr.DataArray, area_weighted: bool) -> xr.DataArray | None:
    if not area_weighted:
        return None
    axes = native_axes(obj)  # a lat/lon field (any selection of it) needs only its latitudes, never a Grid
    if axes is None:
        la, _ = lat_lon_names(obj)
        return np.cos(np.deg2rad(obj[la])).clip(min=0.0)
    grid = Grid(obj[axes.y].values, obj[axes.x].values, axes.mapping)
    return xr.DataArray(area_weights(grid), dims=(axes.y, axes.x), coords={axes.y: obj[axes.y], axes.x: obj[axes.x]})


def _wmean(x: xr.DataArray, dims: Sequence[Hashable], weights: xr.DataArray | None) -> xr.DataArray:
    """NaN-skipping (optionally weighted) mean: ``sum(w x) / sum(w)`` over the finite points of x."""
    dims = [d for d in dims if d in x.dims]
    valid = x.notnull()
    w = valid.astype(np.float64) if weights is None else valid * weights
    num = (x.fillna(0.0) * w).sum(dims)
    den = w.sum(dims)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (num / den).where(den > 0)


def _spatial(obj) -> tuple[str, str]:
    return grid_dims(obj)


def _other_dims(obj, exclude: Iterable[Hashable]) -> list[Hashable]:
    ex = set(exclude)
    return [d for d in obj.dims if d not in ex]


# ---------------------------------------------------------------------------------------------------
# Point-wise deterministic scores
# ---------------------------------------------------------------------------------------------------
def mse(forecast: xr.DataArray, truth: xr.DataArray, dims: Dims = None, area_weighted: bool = False):
    """Mean squared error ``mean_w((f - y)^2)`` over ``dims`` (default: all dims of ``truth``)."""
    f, y = _align(forecast, truth)
    return _wmean((f - y) ** 2, _as_list(dims, y.dims), _weights(y, area_weighted)).rename("mse")


def rmse(forecast: xr.DataArray, truth: xr.DataArray, dims: Dims = None, area_weighted: bool = False):
    """Root mean squared error ``sqrt(mean_w((f - y)^2))``, the mean pooled over all of ``dims``.

    With the default ``dims`` (all dims of ``truth``) the squared errors of every time step and
    grid point are pooled before the square root; pass ``dims=("lat", "lon")`` for one RMSE per
    field (whose mean over time is slightly smaller, by Jensen's inequality).
    """
    return np.sqrt(mse(forecast, truth, dims, area_weighted)).rename("rmse")


def mae(forecast: xr.DataArray, truth: xr.DataArray, dims: Dims = None, area_weighted: bool = False):
    """Mean absolute error ``mean_w(|f - y|)`` over ``dims``."""
    f, y = _align(forecast, truth)
    return _wmean(abs(f - y), _as_list(dims, y.dims), _weights(y, area_weighted)).rename("mae")


def bias(forecast: xr.DataArray, truth: xr.DataArray, dims: Dims = None, area_weighted: bool = False):
    """Mean error ``mean_w(f - y)`` over ``dims`` (positive = forecast too high)."""
    f, y = _align(forecast, truth)
    return _wmean(f - y, _as_list(dims, y.dims), _weights(y, area_weighted)).rename("bias")


# ---------------------------------------------------------------------------------------------------
# Anomaly correlation
# ---------------------------------------------------------------------------------------------------
def sample_climatology(truth: xr.DataArray, sample_dims: Dims = None) -> xr.DataArray:
    """Per-grid-point mean of ``truth`` over its sample dims (default: every non-lat/lon dim).

    Used as the climatology of :func:`acc` for "member-to-member anomalies": anomalies against the
    mean of the very truth fields being scored (e.g. the 13 January 2012 GloSea4 members). It removes
    the seasonal cycle that a training climatology from other months would leave in the anomalies.
    """
    la, lo = _spatial(truth)
    return truth.mean(_as_list(sample_dims, _other_dims(truth, (la, lo))), skipna=True)


def acc(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    climatology: xr.DataArray | None = None,
    dims: Dims = None,
    area_weighted: bool = False,
    centered: bool = True,
) -> xr.DataArray:
    """Anomaly correlation coefficient (pattern correlation of anomalies), per field.

    With anomalies ``f' = f - c`` and ``y' = y - c`` against the climatology ``c``, and (when
    ``centered``) their means over ``dims`` removed, ``f'' = f' - mean_w(f')``, ``y'' = y' - mean_w(y')``::

        ACC = sum_w(f'' y'') / sqrt(sum_w(f''^2) * sum_w(y''^2))

    the sums running over ``dims`` (default: the lat/lon dims, i.e. one ACC per field) and over the
    points where both are finite. The result keeps every other dim (``time``, ``member``); the
    paper-style single number is its mean over time (as :func:`score_table` reports).

    Two climatologies (the ``glosea4-ts-x4`` benchmark reports both, labelled):

    * ``climatology=None`` (default): :func:`sample_climatology` of ``truth``, the per-grid-point
      mean over the samples being scored ("member-to-member anomalies").
    * a training climatology DataArray (e.g. the per-grid-point mean of the training split), passed
      in on the same grid; it must broadcast against the fields (select the month yourself if it
      has a ``month`` dim).
    """
    f, y = _align(forecast, truth)
    if climatology is None:
        climatology = sample_climatology(y)
    else:
        climatology, _ = _align(climatology, y)
    la, lo = _spatial(y)
    dims = _as_list(dims, (la, lo))
    w = _weights(y, area_weighted)
    fa, ya = f - climatology, y - climatology
    valid = fa.notnull() & ya.notnull()
    fa, ya = fa.where(valid), ya.where(valid)
    if centered:
        fa = fa - _wmean(fa, dims, w)
        ya = ya - _wmean(ya, dims, w)
    ww = valid.astype(np.float64) if w is None else valid * w
    num = (fa * ya * ww).sum(dims)
    den = np.sqrt((fa**2 * ww).sum(dims) * (ya**2 * ww).sum(dims))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (num / den).where(den > 0).rename("acc")


# ---------------------------------------------------------------------------------------------------
# Image metrics (scikit-image), per 2-D field
# ---------------------------------------------------------------------------------------------------
def _fieldwise(forecast, truth, fn, dims: Dims, name: str) -> xr.DataArray:
    """Apply ``fn(f2d, y2d) -> float`` to every (lat, lon) field, then average over ``dims``."""
    f, y = _align(forecast, truth)
    la, lo = _spatial(y)
    f, y = xr.broadcast(f, y)
    lead = _other_dims(y, (la, lo))
    f = f.transpose(*lead, la, lo)
    y = y.transpose(*lead, la, lo)
    fv = f.values.reshape(-1, f.sizes[la], f.sizes[lo])
    yv = y.values.reshape(-1, y.sizes[la], y.sizes[lo])
    out = np.array([fn(a, b) for a, b in zip(fv, yv)], dtype=np.float64)
    template = y.isel({la: 0, lo: 0}, drop=True)
    per_field = xr.DataArray(out.reshape(template.shape), dims=template.dims, coords=template.coords)
    avg = [d for d in _as_list(dims, _other_dims(truth, (la, lo))) if d in per_field.dims]
    # Plain mean over fields; a fully masked field (NaN) is skipped. inf (perfect PSNR) stays inf.
    return per_field.mean(avg, skipna=True).rename(name) if avg else per_field.rename(name)


def _field_range(y: np.ndarray, valid: np.ndarray, data_range: float | None) -> float:
    if data_range is not None:
        return float(data_range)
    return float(y[valid].max() - y[valid].min())


def ssim(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    dims: Dims = None,
    data_range: float | None = None,
    win_size: int = 7,
    gaussian_weights: bool = False,
) -> xr.DataArray:
    """Structural similarity of each 2-D (lat, lon) field, averaged over ``dims``.

    Computed by :func:`skimage.metrics.structural_similarity` (Wang et al. 2004, its defaults:
    ``K1=0.01, K2=0.03``, a uniform 7x7 window, sample covariance)::

        SSIM(x, y) = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
        C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = data_range

    evaluated in each window and averaged over the field (skimage drops a ``(win_size-1)//2`` strip
    at the edges of the SSIM map; so do we).

    * ``data_range`` ``L``: default ``None`` = per field, ``max - min`` of the truth's valid points
      (about 110 K for a global surface temperature field, which makes SSIM and PSNR look good; per
      region it is much smaller). Pass a float to fix it.
    * NaN (masked) points: filled in *both* fields with the truth's mean over valid points (so the
      filters can run), then the SSIM map is averaged only over valid points (not over the fill).
      Windows touching the mask edge still see some fill; with no NaN the value equals a direct
      ``structural_similarity(y, f, data_range=L)`` call.
    * ``win_size`` is reduced to the largest odd number <= the field's smaller side when the field
      is smaller than the window (small regions); fields under 3 points on a side give NaN.
    """

    def one(f2: np.ndarray, y2: np.ndarray) -> float:
        from skimage.metrics import structural_similarity

        valid = np.isfinite(f2) & np.isfinite(y2)
        if not valid.any():
            return np.nan
        L = _field_range(y2, valid, data_range)
        if L <= 0:
            return np.nan
        ws = min(win_size, min(y2.shape))
        ws = ws if ws % 2 == 1 else ws - 1
        if ws < 3:
            return np.nan
        fill = float(y2[valid].mean())
        a = np.where(valid, y2, fill).astype(np.float64)
        b = np.where(valid, f2, fill).astype(np.float64)
        _, smap = structural_similarity(
            a, b, data_range=L, win_size=ws, gaussian_weights=gaussian_weights, full=True
        )
        pad = (ws - 1) // 2  # skimage's own edge crop for an explicit win_size
        inner = (slice(pad, smap.shape[0] - pad), slice(pad, smap.shape[1] - pad))
        v = valid[inner]
        return float(smap[inner][v].mean(dtype=np.float64)) if v.any() else np.nan

    return _fieldwise(forecast, truth, one, dims, "ssim")


def psnr(
    forecast: xr.DataArray, truth: xr.DataArray, dims: Dims = None, data_range: float | None = None
) -> xr.DataArray:
    """Peak signal-to-noise ratio (dB) of each 2-D field, averaged over ``dims``.

    ``PSNR = 10 log10(L^2 / MSE)``, with the MSE over the field's valid (non-NaN) points only, via
    :func:`skimage.metrics.peak_signal_noise_ratio` on those points. ``L`` = ``data_range``, default
    per-field ``max - min`` of the truth (see :func:`ssim`). A perfect field gives ``inf`` (and the
    mean over fields is then ``inf``).
    """

    def one(f2: np.ndarray, y2: np.ndarray) -> float:
        from skimage.metrics import peak_signal_noise_ratio

        valid = np.isfinite(f2) & np.isfinite(y2)
        if not valid.any():
            return np.nan
        L = _field_range(y2, valid, data_range)
        with np.errstate(divide="ignore"):
            return float(peak_signal_noise_ratio(y2[valid], f2[valid], data_range=L))

    return _fieldwise(forecast, truth, one, dims, "psnr")


# ---------------------------------------------------------------------------------------------------
# Ensemble scores
# ---------------------------------------------------------------------------------------------------
def crps(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    members_dim: Hashable = "member",
    dims: Dims = None,
    fair: bool = True,
    area_weighted: bool = False,
    chunk_points: int = 1_000_000,
) -> xr.DataArray:
    """Continuous ranked probability score of an ensemble, averaged over ``dims``.

    Per point, for members ``x_1..x_M`` and truth ``y`` (:func:`scoringrules.crps_ensemble`)::

        CRPS      = 1/M sum_i |x_i - y| - 1/(2 M^2)      sum_ij |x_i - x_j|     (fair=False)
        CRPS_fair = 1/M sum_i |x_i - y| - 1/(2 M (M-1)) sum_ij |x_i - x_j|     (fair=True)

    The fair (unbiased) form estimates the CRPS of the distribution the members are drawn from,
    so ensembles of different sizes compare fairly. scoringrules' sorted O(M log M) estimators with
    the same values are used (``"pwm"`` for fair, ``"qd"`` otherwise) instead of the O(M^2)
    pairwise ones. A forecast without ``members_dim``, or with one member, is deterministic: its
    CRPS is the absolute error (``fair`` is not defined for M = 1 and is ignored). A point is
    scored only where the truth and all members are finite.
    """
    import scoringrules as sr

    f, y = _align(forecast, truth)
    if members_dim not in f.dims or f.sizes[members_dim] == 1:
        if members_dim in f.dims:
            f = f.isel({members_dim: 0}, drop=True)
        per_point = abs(f - y)
    else:
        f, y = xr.broadcast(f, y, exclude=[members_dim])
        other = list(y.dims)
        fv = f.transpose(*other, members_dim).values
        yv = y.transpose(*other).values
        M = fv.shape[-1]
        fv2, yv2 = fv.reshape(-1, M), yv.reshape(-1)
        out = np.full(yv2.shape, np.nan)
        ok = np.isfinite(yv2) & np.isfinite(fv2).all(-1)
        idx = np.nonzero(ok)[0]
        est = "pwm" if fair else "qd"
        for s in range(0, idx.size, chunk_points):
            j = idx[s : s + chunk_points]
            out[j] = sr.crps_ensemble(yv2[j], fv2[j], m_axis=-1, estimator=est, backend="numpy")
        per_point = xr.DataArray(out.reshape(yv.shape), dims=other, coords=y.coords)
    return _wmean(per_point, _as_list(dims, y.dims), _weights(y, area_weighted)).rename("crps")


def spread_skill_ratio(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    members_dim: Hashable = "member",
    dims: Dims = None,
    area_weighted: bool = False,
) -> xr.DataArray:
    """Spread-skill ratio of an ensemble (Fortin et al. 2014), ~1 for a calibrated ensemble.

    With the ensemble mean ``m = mean_i x_i`` and the unbiased member variance
    ``s^2 = 1/(M-1) sum_i (x_i - m)^2`` at each point::

        SSR = sqrt((M+1)/M * mean_w(s^2)) / sqrt(mean_w((m - y)^2))

    The ``(M+1)/M`` factor corrects for the finite ensemble: if the truth is exchangeable with the
    members, ``E[(m - y)^2] = (1 + 1/M) sigma^2`` while ``E[s^2] = sigma^2``. < 1 means an
    under-dispersive (over-confident) ensemble. NaN for fewer than two members.
    """
    f, y = _align(forecast, truth)
    if members_dim not in f.dims or f.sizes[members_dim] < 2:
        return xr.DataArray(np.nan, name="spread_skill_ratio")
    M = f.sizes[members_dim]
    mean = f.mean(members_dim, skipna=False)
    var = f.var(members_dim, ddof=1, skipna=False)
    valid = mean.notnull() & y.notnull()
    red = _as_list(dims, y.dims)
    w = _weights(y, area_weighted)
    spread = np.sqrt((M + 1) / M * _wmean(var.where(valid), red, w))
    skill = np.sqrt(_wmean(((mean - y) ** 2).where(valid), red, w))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (spread / skill).rename("spread_skill_ratio")


def rank_histogram(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    members_dim: Hashable = "member",
    dims: Dims = None,
    seed: int | np.random.Generator | None = 0,
) -> xr.DataArray:
    """Rank (Talagrand) histogram: counts of the truth's rank among the members.

    The rank of ``y`` among ``x_1..x_M`` is ``#{i: x_i < y} + U``, with ``U`` uniform on
    ``0..#{i: x_i == y}`` (ties broken randomly with a seeded ``numpy`` generator), so ranks run
    ``0..M`` (M+1 bins). Counts are summed over ``dims`` (default: all dims of ``truth``) and over
    points where the truth and all members are finite. A calibrated ensemble gives a flat histogram
    (``N / (M+1)`` per bin); U-shaped = under-dispersive, dome = over-dispersive.
    Returns an int DataArray with dim ``rank`` (plus any dims not reduced).
    """
    f, y = _align(forecast, truth)
    f, y = xr.broadcast(f, y, exclude=[members_dim])
    M = f.sizes[members_dim]
    valid = y.notnull() & f.notnull().all(members_dim)
    below = (f < y).sum(members_dim)
    ties = (f == y).sum(members_dim)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    u = rng.integers(0, ties.values + 1)
    rank = (below + u).where(valid)
    red = [d for d in _as_list(dims, y.dims) if d in rank.dims]
    counts = [(rank == r).sum(red) for r in range(M + 1)]
    out = xr.concat(counts, dim="rank").assign_coords(rank=np.arange(M + 1))
    return out.astype(np.int64).rename("rank_histogram")


def _rank_frequencies(hist, rank_dim: Hashable) -> tuple[xr.DataArray, int]:
    """Relative bin frequencies ``n_k / N`` along ``rank_dim`` (or the last axis of an array) and M."""
    if not isinstance(hist, xr.DataArray):
        hist = np.asarray(hist)
        hist = xr.DataArray(hist, dims=[f"dim_{i}" for i in range(hist.ndim - 1)] + [rank_dim])
    h = hist.astype(np.float64)
    n = h.sum(rank_dim)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (h / n).where(n > 0), h.sizes[rank_dim] - 1


def reliability_index(hist, rank_dim: Hashable = "rank") -> xr.DataArray:
    """Flatness of a rank histogram: the reliability index of Delle Monache et al. (2006)::

        RI = sum_{k=0..M} | n_k / N - 1 / (M + 1) |

    with ``n_k`` the count of bin ``k`` (of ``M + 1``, from :func:`rank_histogram`) and ``N = sum n_k``. 0 for a
    perfectly flat histogram, ``2 M / (M + 1)`` (about 2) when every truth falls in one bin; a U shape
    (under-dispersive ensemble) or a dome (over-dispersive) scores above 0. Independent of ``N``, unlike
    Candille & Talagrand's ``delta = sum (n_k - N/(M+1))^2 / (N M / (M+1))``, which assumes independent
    truths and grows with ``N`` on a correlated grid. ``hist``: a DataArray with ``rank_dim`` or an array
    with the bins on its last axis; returns one value per remaining dim.
    """
    f, M = _rank_frequencies(hist, rank_dim)
    return abs(f - 1.0 / (M + 1)).sum(rank_dim, skipna=False).rename("reliability_index")


def outside_fraction(hist, rank_dim: Hashable = "rank") -> xr.DataArray:
    """Fraction of truths outside the ensemble's range (first + last rank bins), ``(n_0 + n_M) / N``.

    A calibrated ``M``-member ensemble leaves ``2 / (M + 1)`` outside; more means it is too narrow.
    """
    f, M = _rank_frequencies(hist, rank_dim)
    return (f.isel({rank_dim: 0}) + f.isel({rank_dim: M})).drop_vars(rank_dim, errors="ignore").rename("outside_fraction")


# ---------------------------------------------------------------------------------------------------
# Spectra
# ---------------------------------------------------------------------------------------------------
def power_spectrum(field: xr.DataArray, dims: Dims = None, spacing: float | None = None) -> xr.DataArray:
    """Radially averaged power spectrum of each 2-D (lat, lon) field, averaged over ``dims``.

    For an ``ny x nx`` field ``z`` (NaN filled with the field's mean over valid points, then the mean
    removed)::

        P(kx, ky) = |FFT2(z)|^2 / (nx ny)        (so sum P = sum z^2, Parseval)
        k = sqrt(kx^2 + ky^2),  kx = numpy.fft.fftfreq(nx), ky = fftfreq(ny)   (cycles per grid point)
        S(k_j) = mean of P over the ring |k - k_j| < dk/2,  k_j = j dk,  dk = 1 / min(nx, ny)

    for ``j = 1 .. min(nx, ny)//2`` (up to the Nyquist wavenumber 0.5). The grid is treated as
    uniform in index space (no map projection or meridian convergence). ``spacing`` (e.g. grid
    length in km or degrees) converts the wavenumber to cycles per that unit. Spectra are averaged
    over ``dims`` (default: every non-lat/lon dim; pass ``[]`` to keep them). Returns a DataArray
    over ``wavenumber`` with a ``wavelength`` (= 1 / wavenumber) coordinate.
    """
    la, lo = _spatial(field)
    lead = _other_dims(field, (la, lo))
    z = field.transpose(*lead, la, lo)
    ny, nx = z.sizes[la], z.sizes[lo]
    vals = z.values.astype(np.float64).reshape(-1, ny, nx)
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.fftfreq(nx)[None, :]
    k = np.hypot(ky, kx)
    dk = 1.0 / min(ny, nx)
    nbin = min(ny, nx) // 2
    b = np.rint(k / dk).astype(int)
    in_range = (b >= 1) & (b <= nbin)
    counts = np.bincount(b[in_range], minlength=nbin + 1)[1:]
    spectra = np.full((vals.shape[0], nbin), np.nan)
    for i, v in enumerate(vals):
        ok = np.isfinite(v)
        if not ok.any():
            continue
        v = np.where(ok, v, v[ok].mean())
        v = v - v.mean()
        P = np.abs(np.fft.fft2(v)) ** 2 / (nx * ny)
        sums = np.bincount(b[in_range], weights=P[in_range], minlength=nbin + 1)[1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            spectra[i] = sums / counts
    wn = np.arange(1, nbin + 1) * dk
    unit = "cycles per grid point"
    if spacing is not None:
        wn = wn / float(spacing)
        unit = "cycles per unit of `spacing`"
    template = z.isel({la: 0, lo: 0}, drop=True)
    out = xr.DataArray(
        spectra.reshape(template.shape + (nbin,)),
        dims=template.dims + ("wavenumber",),
        coords={**{c: template.coords[c] for c in template.coords}, "wavenumber": wn},
        name="power_spectrum",
    )
    out = out.assign_coords(wavelength=("wavenumber", 1.0 / wn))
    out.wavenumber.attrs["units"] = unit
    avg = [d for d in _as_list(dims, lead) if d in out.dims]
    if avg:
        out = out.mean(avg, skipna=True)
    out.attrs["long_name"] = "radially averaged power spectrum"
    return out


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------
#: Metrics :func:`score_table` reports by default, in this order.
DEFAULT_METRICS = ("RMSE", "ACC", "SSIM", "PSNR", "CRPS", "SSR")
_KNOWN_METRICS = ("RMSE", "ACC", "SSIM", "PSNR", "CRPS", "SSR", "ACC_train", "MAE", "bias")  # display order


def _variables(obj, variable: str | None) -> dict[str, xr.DataArray]:
    if isinstance(obj, xr.Dataset):
        return {str(k): obj[k] for k in obj.data_vars}
    return {variable or (str(obj.name) if obj.name is not None else "field"): obj}


def score_table(
    truth: xr.DataArray | xr.Dataset,
    forecasts: Mapping[str, xr.DataArray | xr.Dataset],
    regions: Iterable[str] | Mapping[str, Box | None] = ("global", "east_asia", "gulf_coast", "northern_australia"),
    members_dim: Hashable = "member",
    metrics: Sequence[str] | None = None,
    climatology: xr.DataArray | xr.Dataset | None = None,
    area_weighted: bool = False,
    data_range: float | None = None,
    fair: bool = True,
    variable: str | None = None,
) -> pd.DataFrame:
    """Score several methods against one truth, per region and variable; a tidy DataFrame.

    Returns columns ``method, region, variable, metric, value`` (one row per score), in the order
    of ``forecasts``, ``regions``, variables and ``metrics``.

    * ``forecasts``: name -> forecast. A forecast with ``members_dim`` is an ensemble: RMSE, MAE,
      bias, ACC, SSIM and PSNR score its ensemble mean (as the paper's "DPDM 33/100"), CRPS (fair
      unless ``fair=False``) and the spread-skill ratio ``SSR`` score the members. Without that dim
      (or with one member) it is deterministic: CRPS = MAE and SSR is not reported.
    * ``metrics``: default :data:`DEFAULT_METRICS` (the paper's RMSE, ACC, SSIM, PSNR plus CRPS and
      SSR), with ``ACC_train`` appended when ``climatology`` is given. Also available: MAE, bias.
    * ``ACC``: per-field anomaly correlation against the per-grid-point mean of the truth fields
      being scored (member-to-member anomalies, :func:`sample_climatology`), averaged over fields; for a
      single truth field, the centred pattern correlation;
      ``ACC_train``: the same against the given (training) ``climatology``.
    * ``SSIM``/``PSNR``: per field, with ``data_range`` default per-field ``max - min`` of the truth
      *within the region*; averaged over fields.
    * RMSE/MAE/bias/CRPS/SSR pool all points and samples of the region (``area_weighted`` as in
      the module docs).
    * Truth and forecasts may be Datasets (one score per variable) or DataArrays (``variable``
      names it, default the array's name).
    """
    if isinstance(regions, Mapping):
        region_boxes = dict(regions)
    else:
        region_boxes = {r: REGIONS[r] for r in regions}
    if metrics is None:
        metrics = list(DEFAULT_METRICS) + (["ACC_train"] if climatology is not None else [])
    bad = [m for m in metrics if m not in _KNOWN_METRICS]
    if bad:
        raise ValueError(f"Unknown metrics {bad}; known: {_KNOWN_METRICS}.")
    if "ACC_train" in metrics and climatology is None:
        raise ValueError("metric ACC_train needs a `climatology`.")

    truths = _variables(truth, variable)
    clims = _variables(climatology, variable) if climatology is not None else {}
    rows = []
    for method, fc in forecasts.items():
        fcs = _variables(fc, variable)
        for var, y_full in truths.items():
            if var not in fcs:
                if len(fcs) == 1 and len(truths) == 1:
                    fcs = {var: next(iter(fcs.values()))}
                else:
                    raise KeyError(f"forecast {method!r} has no variable {var!r}.")
            f_full = fcs[var]
            # one field (no sample dims): its anomalies are against zero, i.e. ACC is the centred pattern correlation
            sample_clim = (sample_climatology(y_full) if _other_dims(y_full, _spatial(y_full))
                           else xr.zeros_like(y_full))
            for region, box in region_boxes.items():
                y = select_region(y_full, box)
                f = select_region(f_full, box)
                is_ens = members_dim in f.dims and f.sizes[members_dim] > 1
                det = f.mean(members_dim, skipna=False) if members_dim in f.dims else f
                for m in metrics:
                    if m == "RMSE":
                        v = rmse(det, y, area_weighted=area_weighted)
                    elif m == "MAE":
                        v = mae(det, y, area_weighted=area_weighted)
                    elif m == "bias":
                        v = bias(det, y, area_weighted=area_weighted)
                    elif m == "ACC":
                        v = acc(det, y, select_region(sample_clim, box), area_weighted=area_weighted).mean()
                    elif m == "ACC_train":
                        c = clims.get(var, next(iter(clims.values())))
                        v = acc(det, y, select_region(c, box), area_weighted=area_weighted).mean()
                    elif m == "SSIM":
                        v = ssim(det, y, data_range=data_range)
                    elif m == "PSNR":
                        v = psnr(det, y, data_range=data_range)
                    elif m == "CRPS":
                        v = crps(f, y, members_dim=members_dim, fair=fair, area_weighted=area_weighted)
                    elif m == "SSR":
                        if not is_ens:
                            continue
                        v = spread_skill_ratio(f, y, members_dim=members_dim, area_weighted=area_weighted)
                    rows.append((method, region, var, m, float(np.asarray(v).mean())))
    df = pd.DataFrame(rows, columns=["method", "region", "variable", "metric", "value"])
    df.attrs["notes"] = (
        "ACC: anomalies against the per-grid-point mean of the scored truth fields "
        "(member-to-member); ACC_train: against the given training climatology. "
        "SSIM/PSNR data range: "
        + ("per-field max-min of the truth within each region" if data_range is None else f"{data_range}")
        + ". Ensembles: RMSE/ACC/SSIM/PSNR of the ensemble mean; CRPS "
        + ("fair" if fair else "standard")
        + "; SSR = sqrt((M+1)/M mean var_ddof1) / RMSE(mean). Deterministic: CRPS = MAE. "
        + ("cos(lat) area weighting." if area_weighted else "No area weighting.")
    )
    return df


def _fmt(v: float, floatfmt: str | None) -> str:
    if v is None or math.isnan(v):
        return "–"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if floatfmt is None:  # 4 significant digits, trailing zeros kept: 13.00, 0.9997, 3192
        return format(v, "#.4g").rstrip(".")
    return format(v, floatfmt)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(
    df: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    style: str = "table1",
    floatfmt: str | None = None,
    units: Mapping[str, str] | None = None,
) -> str:
    """Format a :func:`score_table` frame as markdown, methods as rows (no ``tabulate`` needed).

    * ``style="table1"`` (the paper's Table 1): one column per variable, each cell the metrics joined
      by ``/`` in the order stated above the table (``metrics``, default all present, in the order
      RMSE, ACC, SSIM, PSNR, CRPS, SSR, ACC_train, MAE, bias).
    * ``style="columns"``: one column per (variable,) metric.

    One table per region (under a ``**region**`` line) when the frame has several regions. Missing
    scores print as ``–``; ``floatfmt`` (a format spec such as ``".3f"``) formats the numbers,
    default four significant digits with trailing zeros kept; ``units`` maps variable -> unit for the
    column headers.
    """
    if style not in ("table1", "columns"):
        raise ValueError("style must be 'table1' or 'columns'.")
    present = list(dict.fromkeys(df["metric"]))
    if metrics is None:
        order = {m: i for i, m in enumerate(_KNOWN_METRICS)}
        metrics = sorted(present, key=lambda m: order.get(m, len(order)))
    metrics = [m for m in metrics if m in present]
    methods = list(dict.fromkeys(df["method"]))
    variables = list(dict.fromkeys(df["variable"]))
    regions = list(dict.fromkeys(df["region"]))
    units = dict(units or {})
    lookup = {
        (r.method, r.region, r.variable, r.metric): r.value for r in df.itertuples(index=False)
    }

    def vname(v):
        return f"{v} ({units[v]})" if v in units else str(v)

    blocks = []
    for region in regions:
        if style == "table1":
            header = ["method"] + [vname(v) for v in variables]
            rows = [
                [m]
                + [" / ".join(_fmt(lookup.get((m, region, v, k), np.nan), floatfmt) for k in metrics) for v in variables]
                for m in methods
            ]
            caption = "Cells: " + " / ".join(metrics)
        else:
            cols = [(v, k) for v in variables for k in metrics]
            header = ["method"] + [k if len(variables) == 1 else f"{vname(v)} {k}" for v, k in cols]
            rows = [[m] + [_fmt(lookup.get((m, region, v, k), np.nan), floatfmt) for v, k in cols] for m in methods]
            caption = f"Variable: {vname(variables[0])}" if len(variables) == 1 else ""
        parts = []
        if len(regions) > 1:
            parts.append(f"**{region}**")
        if caption:
            parts.append(caption)
        parts.append(_md_table(header, rows))
        blocks.append("\n\n".join(parts))
    return "\n\n".join(blocks) + "\n"
