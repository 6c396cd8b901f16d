"""Distribution scores a climate scientist reads beside RMSE: precipitation's wet fraction, tails, total and sign,
and the consistency between variables of the fine-scale detail a model adds.

Ensembles are pooled over members (the distribution of every member's values), so a model whose members are each
realistic scores as realistic even when their mean is smooth. Everything is in the variable's own units.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import xarray as xr

from . import climate_scores

__all__ = ["DEFAULT_QUANTILES", "DEFAULT_WET_THRESHOLDS", "distribution_rows", "fine_scale_anomaly",
           "fine_scale_correlation", "precipitation_rows", "precipitation_summary", "quantile_bias", "wasserstein"]

# in mm (or kg m-2) of the accumulation scored; a rate in mm/day reads them as mm/day
DEFAULT_WET_THRESHOLDS = (0.1, 1.0, 10.0)
# the tails and the bulk of a distribution (CORDEX ML-Bench scores quantile biases like these)
DEFAULT_QUANTILES = (0.01, 0.05, 0.95, 0.99)


_values = climate_scores._finite  # every finite value, flattened


def precipitation_summary(field: xr.DataArray, thresholds: Sequence[float] = DEFAULT_WET_THRESHOLDS,
                          members_dim: Hashable = "member") -> dict[str, float]:
    """Wet fraction at each threshold (``>= t``), the 95th/99th percentiles, the mean (the total per point: the
    area total divided by the number of points) and the fraction of negative values (below -1e-6, so that the
    round-off of a GRIB decoding or a regridding does not count), over every point (and member).
    """
    v = _values(field)
    if v.size == 0:
        raise ValueError(f"{field.name!r} has no finite values to summarise.")
    out = {f"wet>={t:g}": float(np.mean(v >= t)) for t in thresholds}
    out.update({"p95": float(np.percentile(v, 95)), "p99": float(np.percentile(v, 99)), "mean": float(v.mean()),
                "negative": float(np.mean(v < -1e-6))})
    return out


def quantile_bias(field: xr.DataArray, truth: xr.DataArray,
                  quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, float]:
    """Each quantile of ``field`` (every point and member pooled) minus the truth's, in the variable's units
    (:func:`climate_scores.quantile_biases`), keyed ``q1``, ``q99`` ..."""
    biases = climate_scores.quantile_biases(field, truth, quantiles)
    return {f"q{100 * q:g}": float(b) for q, b in zip(quantiles, biases)}


#: the first Wasserstein distance of the pooled values (:func:`climate_scores.wasserstein`)
wasserstein = climate_scores.wasserstein


def distribution_rows(truth: xr.DataArray, forecasts: Mapping[str, xr.DataArray],
                      quantiles: Sequence[float] = DEFAULT_QUANTILES) -> list[dict]:
    """One row per method: :func:`quantile_bias` and :func:`wasserstein` against the truth."""
    return [{"method": name, **quantile_bias(fc, truth, quantiles), "wasserstein": wasserstein(fc, truth)}
            for name, fc in forecasts.items()]


def fine_scale_anomaly(field: xr.DataArray, scale_factor: int) -> xr.DataArray:
    """``field`` minus its own ``scale_factor`` x ``scale_factor`` block mean: the detail below the coarse grid."""
    from .conservation import block_mean, block_repeat
    from .grids import grid_dims

    field = field.transpose(..., *grid_dims(field))
    values = np.asarray(field.values, dtype=np.float64)
    return field.copy(data=values - block_repeat(block_mean(values, scale_factor), scale_factor))


def fine_scale_correlation(ds: xr.Dataset, a: str, b: str, scale_factor: int,
                           members_dim: Hashable = "member") -> float:
    """Spatial correlation of the fine-scale anomalies of variables ``a`` and ``b`` (e.g. 2t and tp: cooler where it
    rains; 10u and 10v), pooled over every point (and member). A model that treats variables independently gets 0
    where the truth has a sign."""
    fa, fb = (_values(fine_scale_anomaly(ds[v], scale_factor)) for v in (a, b))
    if fa.size != fb.size or fa.size < 3:
        raise ValueError(f"{a} and {b} must share one grid with at least 3 finite points.")
    return float(np.corrcoef(fa, fb)[0, 1])


def precipitation_rows(truth: xr.DataArray, forecasts: Mapping[str, xr.DataArray],
                       thresholds: Sequence[float] = DEFAULT_WET_THRESHOLDS,
                       members_dim: Hashable = "member") -> list[dict]:
    """One row per method: :func:`precipitation_summary` and each statistic's ratio to the truth's."""
    ref = precipitation_summary(truth, thresholds)
    rows = [{"method": "truth", **ref}]
    for name, fc in forecasts.items():
        s = precipitation_summary(fc, thresholds, members_dim)
        ratios = {f"{k}/truth": (s[k] / ref[k] if ref[k] else float("nan")) for k in s if k != "negative"}
        rows.append({"method": name, **s, **ratios})
    return rows
