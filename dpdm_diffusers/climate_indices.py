"""ETCCDI climate indices of daily fields through xclim, and how an ensemble's indices compare with the truth's.

Indices (annual by default, ``freq="YS"``; any pandas frequency such as ``"QS-DEC"`` for seasons):

========  ===================================================  ===========================================
index     meaning                                              xclim
========  ===================================================  ===========================================
Rx1day    wettest day (mm/day)                                 ``max_1day_precipitation_amount``
SDII      mean precipitation of wet days (>= 1 mm)             ``daily_pr_intensity``
CDD       longest dry spell (< 1 mm/day), days                 ``maximum_consecutive_dry_days``
CWD       longest wet spell (>= 1 mm/day), days                ``maximum_consecutive_wet_days``
R95pTOT   fraction of the wet-day total from days above the    ``fraction_over_precip_thresh``
          truth's 95th percentile of wet days
TXx       hottest day (of daily maxima, or of the daily        ``tx_max``
          temperature given)
SU        summer days: temperature above 25 degC               ``tx_days_above``
warm_dry  compound hot-dry days: temperature above the         ``warm_and_dry_days``
          truth's 75th percentile and precipitation below
          its 25th (by day of year)
========  ===================================================  ===========================================

Percentile thresholds come from the truth and are applied to every forecast, so an index bias is a frequency bias
at the truth's thresholds. Precipitation given as a daily amount (mm, m, kg m-2) is read as mm/day.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import xarray as xr

__all__ = ["INDICES", "compute_index", "index_scores", "indices_for", "is_daily", "roles"]

#: index -> the roles of the variables it needs ("pr", "tas")
INDICES: dict[str, tuple[str, ...]] = {"Rx1day": ("pr",), "SDII": ("pr",), "CDD": ("pr",), "CWD": ("pr",),
                                      "R95pTOT": ("pr",), "TXx": ("tas",), "SU": ("tas",), "warm_dry": ("tas", "pr")}
_AMOUNTS = {"mm": 1.0, "m": 1000.0, "kg m-2": 1.0, "kg m**-2": 1.0, "kg/m2": 1.0, "kg/m^2": 1.0}


def is_daily(x: xr.DataArray, time_dim: Hashable = "time") -> bool:
    """Whether ``x`` has a daily time axis (the ETCCDI indices are defined on daily data)."""
    if time_dim not in x.dims or x.sizes[time_dim] < 3:
        return False
    import xarray.coding.frequencies as freq

    f = freq.infer_freq(x[time_dim])
    return f in ("D", "1D")


def _as_rate(pr: xr.DataArray) -> xr.DataArray:
    units = str(pr.attrs.get("units", "")).strip()
    if units in _AMOUNTS:  # a daily total: the same number per day
        return (pr * _AMOUNTS[units]).assign_attrs(pr.attrs, units="mm/d")
    if not units:
        raise ValueError(f"{pr.name!r} has no units; set them (e.g. mm/day or kg m-2 s-1) to compute its indices.")
    return pr


def _as_temperature(tas: xr.DataArray) -> xr.DataArray:
    if not str(tas.attrs.get("units", "")).strip():
        raise ValueError(f"{tas.name!r} has no units; set them (K or degC) to compute its indices.")
    return tas


@dataclass(frozen=True)
class _Thresholds:
    """Percentile thresholds taken from the truth."""

    pr95: xr.DataArray | None = None
    tas75: xr.DataArray | None = None
    pr25: xr.DataArray | None = None


def _thresholds(index: str, truth: Mapping[str, xr.DataArray], time_dim: Hashable) -> _Thresholds:
    from xclim.core.calendar import percentile_doy

    if index == "R95pTOT":
        pr = _as_rate(truth["pr"])
        wet = pr.where(pr >= _one_mm(pr))
        return _Thresholds(pr95=wet.quantile(0.95, time_dim).drop_vars("quantile").assign_attrs(units=pr.attrs["units"]))
    if index == "warm_dry":
        pr, tas = _as_rate(truth["pr"]), _as_temperature(truth["tas"])
        wet = pr.where(pr >= _one_mm(pr)).assign_attrs(pr.attrs)
        return _Thresholds(tas75=percentile_doy(tas, per=75).sel(percentiles=75, drop=True),
                           pr25=percentile_doy(wet, per=25).sel(percentiles=25, drop=True))
    return _Thresholds()


def _one_mm(pr: xr.DataArray) -> float:
    from xclim.core.units import convert_units_to

    return float(convert_units_to("1 mm/d", pr, context="hydro"))


def compute_index(index: str, fields: Mapping[str, xr.DataArray], freq: str = "YS", *,
                  thresholds: _Thresholds | None = None) -> xr.DataArray:
    """One index of daily ``fields`` (role -> DataArray: ``"pr"`` precipitation, ``"tas"`` temperature), per
    ``freq`` period; extra dims (member, lat, lon) are kept. Percentile thresholds default to ``fields``' own."""
    import xclim.indices as xi

    if index not in INDICES:
        raise KeyError(f"Unknown index {index!r}; choose from {list(INDICES)}.")
    missing = [r for r in INDICES[index] if r not in fields]
    if missing:
        raise ValueError(f"{index} needs {missing} (pr: precipitation, tas: temperature).")
    th = thresholds or _thresholds(index, fields, "time")
    pr = _as_rate(fields["pr"]) if "pr" in fields else None
    tas = _as_temperature(fields["tas"]) if "tas" in fields else None
    if index == "Rx1day":
        out = xi.max_1day_precipitation_amount(pr, freq=freq)
    elif index == "SDII":
        out = xi.daily_pr_intensity(pr, thresh="1 mm/day", freq=freq)
    elif index == "CDD":
        out = xi.maximum_consecutive_dry_days(pr, thresh="1 mm/day", freq=freq)
    elif index == "CWD":
        out = xi.maximum_consecutive_wet_days(pr, thresh="1 mm/day", freq=freq)
    elif index == "R95pTOT":
        out = xi.fraction_over_precip_thresh(pr, th.pr95, thresh="1 mm/day", freq=freq)
    elif index == "TXx":
        out = xi.tx_max(tas, freq=freq)
    elif index == "SU":
        out = xi.tx_days_above(tas, thresh="25 degC", freq=freq)
    else:  # warm_dry
        out = xi.warm_and_dry_days(tas, pr, th.tas75, th.pr25, freq=freq)
    return out.rename(index)


def index_scores(index: str, truth: Mapping[str, xr.DataArray], forecasts: Mapping[str, Mapping[str, xr.DataArray]],
                 freq: str = "YS", member_dim: Hashable = "member") -> list[dict]:
    """Each forecast's index against the truth's, at the truth's percentile thresholds.

    Returns one row per forecast: ``truth`` (the truth's index, mean over periods and points), ``mean_bias`` (each
    member's index minus the truth's, averaged over periods, points and members), ``member_bias_spread`` (the
    standard deviation of the members' mean biases), ``ratio`` (members' mean index over the truth's) and
    ``member_index_spread`` (the spread of the index across members, mean over periods and points; 0 for one
    realisation)."""
    th = _thresholds(index, truth, "time")
    ref = compute_index(index, truth, freq, thresholds=th)
    ref_mean = float(ref.mean())
    rows = []
    for name, fields in forecasts.items():
        idx = compute_index(index, fields, freq, thresholds=th)
        diff = idx - ref
        other = [d for d in diff.dims if d != member_dim]
        per_member = diff.mean(other)
        ens = member_dim in idx.dims and idx.sizes[member_dim] > 1
        rows.append({"method": name, "index": index, "truth": ref_mean, "mean_bias": float(per_member.mean()),
                     "member_bias_spread": float(per_member.std()) if ens else 0.0,
                     "ratio": float(idx.mean()) / ref_mean if ref_mean else float("nan"),
                     "member_index_spread": float(idx.std(member_dim).mean()) if ens else 0.0})
    return rows


def indices_for(roles: Sequence[str]) -> list[str]:
    """The indices that the variable roles present (``"pr"``, ``"tas"``) allow."""
    return [i for i, need in INDICES.items() if set(need) <= set(roles)]


def roles(ds: xr.Dataset) -> dict[str, str]:
    """Which variable of ``ds`` is precipitation (``"pr"``) and which temperature (``"tas"``), from names, standard
    names and units (the first of each)."""
    from .statistics import default_transform

    out: dict[str, str] = {}
    for v, da in ds.data_vars.items():
        units = str(da.attrs.get("units", "")).strip()
        if "pr" not in out and default_transform(str(v), da.attrs) == "log1p":
            out["pr"] = str(v)
        elif "tas" not in out and units in ("K", "degC", "celsius", "degrees_Celsius", "deg_C"):
            out["tas"] = str(v)
    return out

