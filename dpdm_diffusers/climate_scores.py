"""Scores a climate scientist reads beside RMSE, over xarray, on any time frequency.

Each score is a small pure function (weatherbench2 style) of a forecast and the truth with named dims, in the
variable's own units; :data:`REGISTRY` maps a name to one, so adding a score is one entry, and :func:`score` runs a
list of them into a tidy table (method, variable, metric, value, member_spread).

Two kinds of entry:

* ``"field"`` scores judge one realisation (the distribution of its values, its spectrum, its persistence, its
  change signal). An ensemble is scored member by member: the table gives the members' mean and their spread, the
  way CORDEX ML-Bench scores each realisation of a generative model against the truth.
* ``"ensemble"`` scores judge the whole ensemble as a forecast distribution (CRPS, threshold-weighted CRPS, Brier).

Dims: ``member`` (members), ``time``; every other dim of the field is spatial. Quantile thresholds of the tail
scores are the truth's own (e.g. its 95th percentile), so they are defined for any variable without a unit table.
The ETCCDI indices of daily data are in :mod:`dpdm_diffusers.climate_indices` (xclim).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
import xarray as xr

from . import metrics

__all__ = ["EXTREMES", "REGISTRY", "Metric", "anomalies", "brier_score", "change_signal", "change_signal_bias",
           "interannual_variability_ratio", "quantile_biases", "intervariable_correlation",
           "intervariable_correlation_members", "lag1_autocorrelation",
           "lag1_autocorrelation_bias", "quantile_bias", "ralsd", "register", "score", "threshold_weighted_crps",
           "wasserstein", "wasserstein_per_point"]

MEMBER, TIME = "member", "time"


def _finite(x: xr.DataArray) -> np.ndarray:
    v = np.asarray(x.values, dtype=np.float64).ravel()
    return v[np.isfinite(v)]


def _spatial_dims(x: xr.DataArray, time_dim: Hashable = TIME, member_dim: Hashable = MEMBER) -> list[Hashable]:
    return [d for d in x.dims if d not in (time_dim, member_dim)]


# ---------------------------------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------------------------------
def quantile_biases(forecast: xr.DataArray, truth: xr.DataArray, quantiles: Sequence[float]) -> np.ndarray:
    """Each quantile of every value of ``forecast`` minus the truth's, in the variable's units."""
    return np.quantile(_finite(forecast), quantiles) - np.quantile(_finite(truth), quantiles)


def quantile_bias(forecast: xr.DataArray, truth: xr.DataArray, q: float) -> float:
    """The ``q`` quantile of every value of ``forecast`` minus the truth's, in the variable's units."""
    return float(quantile_biases(forecast, truth, [q])[0])


def wasserstein(forecast: xr.DataArray, truth: xr.DataArray) -> float:
    """First Wasserstein (earth mover's) distance between all values of ``forecast`` and of the truth, in the
    variable's units (:func:`scipy.stats.wasserstein_distance`): how far the whole distribution is moved."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(_finite(forecast), _finite(truth)))


def wasserstein_per_point(forecast: xr.DataArray, truth: xr.DataArray, time_dim: Hashable = TIME) -> xr.DataArray:
    """The Wasserstein distance of each grid point's distribution over time (members pooled into it) to the
    truth's at that point: a map of where the local climate's distribution is wrong."""
    from scipy.stats import wasserstein_distance

    space = _spatial_dims(truth, time_dim)
    pooled = [d for d in forecast.dims if d not in space]
    f = forecast.transpose(*space, *pooled).values.reshape(-1, int(np.prod([forecast.sizes[d] for d in pooled])))
    y = truth.transpose(*space, *[d for d in truth.dims if d not in space]).values.reshape(f.shape[0], -1)
    out = np.full(f.shape[0], np.nan)
    for i, (a, b) in enumerate(zip(f, y)):
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if a.size and b.size:
            out[i] = wasserstein_distance(a, b)
    template = truth.isel({d: 0 for d in truth.dims if d not in space}, drop=True)
    return template.copy(data=out.reshape(template.shape)).rename("wasserstein_per_point")


# ---------------------------------------------------------------------------------------------------
# Spectra
# ---------------------------------------------------------------------------------------------------
def ralsd(forecast: xr.DataArray, truth: xr.DataArray) -> float:
    """Radially averaged log spectral distance, in dB (Harris et al. 2022; CORDEX ML-Bench)::

        RALSD = sqrt( mean_k (10 log10(P_forecast(k) / P_truth(k)))^2 )

    over the wavenumbers ``k`` of :func:`metrics.power_spectrum` (each spectrum averaged over every non-spatial
    dim). 0 = the truth's spectrum; 3 dB = power wrong by a factor of 2 on average. Too smooth fields (an ensemble
    mean, interpolation) lose power at high ``k`` and score high."""
    pf, pt = metrics.power_spectrum(forecast).values, metrics.power_spectrum(truth).values
    ok = np.isfinite(pf) & np.isfinite(pt) & (pf > 0) & (pt > 0)
    return float(np.sqrt(np.mean((10 * np.log10(pf[ok] / pt[ok])) ** 2)))


# ---------------------------------------------------------------------------------------------------
# Time: persistence, variability, the change signal
# ---------------------------------------------------------------------------------------------------
def _years(x: xr.DataArray, time_dim: Hashable = TIME) -> xr.DataArray:
    """Annual means when the series is finer than yearly (year-to-year persistence is about years)."""
    years = x[time_dim].dt.year
    if np.unique(years.values).size == x.sizes[time_dim]:
        return x
    return x.groupby(years.rename("year")).mean(time_dim).rename(year=time_dim)


def _segment_ids(times) -> np.ndarray:
    """Which contiguous run each time step belongs to: a gap of more than 1.5 typical steps (e.g. 1990 -> 2070 when
    two periods are scored together) starts a new run, so no anomaly or lag pair spans it."""
    values = np.asarray(times)
    if values.size < 3:
        return np.zeros(values.size, dtype=int)
    steps = np.diff(values)
    if np.issubdtype(steps.dtype, np.timedelta64):
        steps = steps.astype("timedelta64[s]").astype(np.float64)
    elif steps.dtype == object:  # cftime differences are datetime.timedelta
        steps = np.array([d.total_seconds() for d in steps], dtype=np.float64)
    steps = np.asarray(steps, dtype=np.float64)
    return np.r_[0, np.cumsum(steps > 1.5 * np.median(steps))]


def anomalies(x: xr.DataArray, time_dim: Hashable = TIME, detrend: bool = True) -> xr.DataArray:
    """``x`` minus its linear trend in time (or only its time mean, ``detrend=False``), per point (and member) and
    per contiguous run of time steps: a climate-change trend, or the jump between two scored periods, is not
    persistence."""
    ids = _segment_ids(x[time_dim].values)
    parts = []
    for k in np.unique(ids):
        seg = x.isel({time_dim: np.flatnonzero(ids == k)})
        t = np.arange(seg.sizes[time_dim], dtype=np.float64)
        tt = xr.DataArray(t - t.mean(), dims=[time_dim], coords={time_dim: seg[time_dim]})
        mean = seg.mean(time_dim)
        if detrend and seg.sizes[time_dim] > 1:
            slope = ((seg - mean) * tt).sum(time_dim) / float((tt**2).sum())
            parts.append(seg - mean - slope * tt)
        else:
            parts.append(seg - mean)
    return parts[0] if len(parts) == 1 else xr.concat(parts, dim=time_dim)


def lag1_autocorrelation(x: xr.DataArray, time_dim: Hashable = TIME, detrend: bool = True,
                         annual: bool = True) -> xr.DataArray:
    """Lag-1 autocorrelation of each point's (and member's) anomaly series (:func:`anomalies`), of annual means
    when ``annual`` and the data is finer than yearly; pairs across a gap in time are left out."""
    x = _years(x, time_dim) if annual else x
    a = anomalies(x, time_dim, detrend)
    ids = _segment_ids(x[time_dim].values)
    same = xr.DataArray(ids[1:] == ids[:-1], dims=[time_dim])
    a0, a1 = a.isel({time_dim: slice(None, -1)}), a.isel({time_dim: slice(1, None)})
    a0, a1 = (v.drop_vars(time_dim).where(same, 0.0) for v in (a0, a1))
    num = (a0 * a1).sum(time_dim)
    den = np.sqrt((a0**2).sum(time_dim) * (a1**2).sum(time_dim))
    return (num / den).rename("lag1_autocorrelation")


def lag1_autocorrelation_bias(forecast: xr.DataArray, truth: xr.DataArray, time_dim: Hashable = TIME) -> float:
    """Mean over points of the forecast's lag-1 autocorrelation minus the truth's (< 0: persistence lost)."""
    return float((lag1_autocorrelation(forecast, time_dim) - lag1_autocorrelation(truth, time_dim)).mean())


def interannual_variability_ratio(forecast: xr.DataArray, truth: xr.DataArray, time_dim: Hashable = TIME) -> float:
    """Mean over points of the standard deviation of the forecast's detrended annual means over the truth's
    (1 = right year-to-year variability; > 1: too variable, e.g. noise added independently each year)."""
    sf = anomalies(_years(forecast, time_dim), time_dim).std(time_dim)
    st = anomalies(_years(truth, time_dim), time_dim).std(time_dim)
    return float((sf / st).where(st > 0).mean())


def _period(x: xr.DataArray, period: tuple[str, str], time_dim: Hashable) -> xr.DataArray:
    sel = x.sel({time_dim: slice(*period)})
    if sel.sizes[time_dim] == 0:
        raise ValueError(f"No time step of {x.name!r} falls in {period[0]}..{period[1]}.")
    return sel


def change_signal(x: xr.DataArray, reference: tuple[str, str], future: tuple[str, str],
                  time_dim: Hashable = TIME) -> xr.DataArray:
    """The climate-change signal per point (and member): the mean over ``future`` minus the mean over
    ``reference`` (each a ``(start, end)`` pair of time labels, inclusive)."""
    return (_period(x, future, time_dim).mean(time_dim) - _period(x, reference, time_dim).mean(time_dim)).rename(
        "change_signal")


def change_signal_bias(forecast: xr.DataArray, truth: xr.DataArray, reference: tuple[str, str],
                       future: tuple[str, str], time_dim: Hashable = TIME) -> xr.DataArray:
    """The forecast's change signal minus the truth's, per point (a map)."""
    return (change_signal(forecast, reference, future, time_dim)
            - change_signal(truth, reference, future, time_dim)).rename("change_signal_bias")


# ---------------------------------------------------------------------------------------------------
# Several variables
# ---------------------------------------------------------------------------------------------------
def intervariable_correlation(ds: xr.Dataset, a: str, b: str, time_dim: Hashable = TIME) -> xr.DataArray:
    """Correlation over time of variables ``a`` and ``b`` at each point (and member), e.g. temperature and
    precipitation; over space when there is no time dim."""
    dim = time_dim if time_dim in ds[a].dims else _spatial_dims(ds[a], time_dim)
    return xr.corr(ds[a], ds[b], dim=dim).rename(f"corr_{a}_{b}")


def intervariable_correlation_members(ds: xr.Dataset, a: str, b: str, time_dim: Hashable = TIME,
                                      member_dim: Hashable = MEMBER) -> list[float]:
    """Each member's (or the one field's) correlation of ``a`` and ``b`` over time, mean over points: compare with
    the truth's to see whether members keep the link between variables (e.g. hot and dry together)."""
    corr = intervariable_correlation(ds, a, b, time_dim)
    other = [d for d in corr.dims if d != member_dim]
    per = corr.mean(other) if other else corr
    return [float(x) for x in np.atleast_1d(per.values)]


# ---------------------------------------------------------------------------------------------------
# Tails of an ensemble
# ---------------------------------------------------------------------------------------------------
def _ensemble_arrays(forecast: xr.DataArray, truth: xr.DataArray, member_dim: Hashable):
    f, y = xr.broadcast(forecast, truth, exclude=[member_dim])
    fv = f.transpose(*y.dims, member_dim).values.reshape(-1, f.sizes[member_dim])
    yv = y.values.ravel()
    ok = np.isfinite(yv) & np.isfinite(fv).all(-1)
    return fv[ok], yv[ok]


def threshold_weighted_crps(forecast: xr.DataArray, truth: xr.DataArray, threshold: float,
                            member_dim: Hashable = MEMBER) -> float:
    """Threshold-weighted CRPS (scoringrules' ``twcrps_ensemble``, chaining function ``max(x, threshold)``): the
    CRPS of the part of the distribution above ``threshold``, so only the upper tail counts. Lower is better."""
    import scoringrules as sr

    fv, yv = _ensemble_arrays(forecast, truth, member_dim)
    t = float(threshold)
    return float(np.mean(sr.twcrps_ensemble(yv, fv, v_func=lambda x: np.maximum(x, t), backend="numpy")))


def brier_score(forecast: xr.DataArray, truth: xr.DataArray, threshold: float, member_dim: Hashable = MEMBER) -> float:
    """Brier score of exceeding ``threshold``: the ensemble's fraction of members above it against whether the
    truth is (scoringrules' ``brier_score``). 0 is perfect; a climatological forecast scores p (1 - p)."""
    import scoringrules as sr

    fv, yv = _ensemble_arrays(forecast, truth, member_dim)
    prob = (fv > threshold).mean(-1)
    return float(np.mean(sr.brier_score((yv > threshold).astype(float), prob, backend="numpy")))


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One registry entry.

    ``fn(forecast, truth, **ctx) -> float``; ``kind``: ``"field"`` (applied to each member, or to a deterministic
    forecast) or ``"ensemble"`` (needs several members); ``needs``: context it cannot do without (``"time"``: a time
    dim with at least 3 steps; ``"periods"``: ``reference`` and ``future`` periods); ``ideal``: the perfect value
    (0 for a bias or a distance, 1 for a ratio); ``units``: ``"variable"`` when in the variable's units."""

    fn: Callable[..., float]
    kind: str = "field"
    needs: tuple[str, ...] = ()
    ideal: float = 0.0
    units: str = "variable"
    description: str = ""


def _truth_quantile_threshold(score_fn, q: float):
    def fn(forecast, truth, member_dim=MEMBER, **_):
        return score_fn(forecast, truth, float(np.quantile(_finite(truth), q)), member_dim=member_dim)

    return fn


def _change_bias_mean(forecast, truth, reference, future, time_dim=TIME, **_):
    return float(change_signal_bias(forecast, truth, reference, future, time_dim).mean())


def _change_bias_rms(forecast, truth, reference, future, time_dim=TIME, **_):
    b = change_signal_bias(forecast, truth, reference, future, time_dim)
    return float(np.sqrt((b**2).mean()))


def _field(fn):
    return lambda forecast, truth, **_: fn(forecast, truth)


def _timed(fn):
    return lambda forecast, truth, time_dim=TIME, **_: fn(forecast, truth, time_dim=time_dim)


REGISTRY: dict[str, Metric] = {
    "RMSE": Metric(_field(lambda f, t: float(metrics.rmse(f, t))), description="root-mean-square error"),
    "bias": Metric(_field(lambda f, t: float(metrics.bias(f, t))), description="mean error"),
    **{f"q{q:g}_bias": Metric(_field(partial(lambda f, t, q: quantile_bias(f, t, q / 100), q=q)),
                              description=f"{q:g}th percentile of all values minus the truth's")
       for q in (1, 5, 95, 99)},
    "wasserstein": Metric(_field(wasserstein), description="Wasserstein distance of all values to the truth's"),
    "wasserstein_per_point": Metric(
        lambda f, t, time_dim=TIME, **_: float(wasserstein_per_point(f, t, time_dim).mean()), needs=("time",),
        description="mean over points of the Wasserstein distance of each point's distribution over time"),
    "RALSD": Metric(_field(ralsd), units="dB", description="radially averaged log spectral distance"),
    "lag1_autocorrelation_bias": Metric(_timed(lag1_autocorrelation_bias), needs=("time",), units="1",
                                        description="lag-1 autocorrelation of detrended annual anomalies minus "
                                                    "the truth's, mean over points"),
    "interannual_variability_ratio": Metric(_timed(interannual_variability_ratio), needs=("time",), ideal=1.0,
                                            units="1", description="std of detrended annual means over the "
                                                                   "truth's, mean over points"),
    "change_signal_bias": Metric(_change_bias_mean, needs=("time", "periods"),
                                 description="change signal (future - reference mean) minus the truth's, mean "
                                             "over points"),
    "change_signal_bias_rms": Metric(_change_bias_rms, needs=("time", "periods"),
                                     description="root mean square over points of the change-signal bias"),
    "CRPS": Metric(lambda f, t, member_dim=MEMBER, **_: float(metrics.crps(f, t, members_dim=member_dim)),
                   kind="ensemble", description="fair CRPS of the ensemble"),
    **{f"twCRPS_q{q:g}": Metric(_truth_quantile_threshold(threshold_weighted_crps, q / 100), kind="ensemble",
                                description=f"threshold-weighted CRPS above the truth's {q:g}th percentile")
       for q in (95, 99)},
    **{f"Brier_q{q:g}": Metric(_truth_quantile_threshold(brier_score, q / 100), kind="ensemble", units="1",
                               description=f"Brier score of exceeding the truth's {q:g}th percentile")
       for q in (95, 99)},
}

#: The scores :func:`score` runs by default (every entry whose needs are met).
DEFAULT = tuple(REGISTRY)
#: The tails and distribution beside RMSE and CRPS on every benchmark table.
EXTREMES = ("q1_bias", "q99_bias", "wasserstein", "RALSD", "twCRPS_q99")


def register(name: str, metric: Metric, overwrite: bool = False) -> None:
    """Add a score to :data:`REGISTRY` (``overwrite`` to replace one)."""
    if name in REGISTRY and not overwrite:
        raise ValueError(f"A metric named {name!r} is registered already; pass overwrite=True to replace it.")
    REGISTRY[name] = metric


@dataclass
class _Context:
    member_dim: Hashable = MEMBER
    time_dim: Hashable = TIME
    periods: dict = field(default_factory=dict)

    def missing(self, metric: Metric, truth: xr.DataArray) -> str | None:
        if "time" in metric.needs and (self.time_dim not in truth.dims or truth.sizes[self.time_dim] < 3):
            return f"needs a '{self.time_dim}' dim of at least 3 steps"
        if "periods" in metric.needs and not self.periods:
            return "needs reference and future periods"
        return None


def score(truth: xr.Dataset | xr.DataArray, forecasts: Mapping[str, xr.Dataset | xr.DataArray],
          metrics_: Sequence[str] | None = None, *, member_dim: Hashable = MEMBER, time_dim: Hashable = TIME,
          reference: tuple[str, str] | None = None, future: tuple[str, str] | None = None,
          progress: bool = False) -> pd.DataFrame:
    """Run registry scores on every forecast and variable.

    Args:
        truth: The truth (a Dataset, or one variable as a DataArray).
        forecasts: Name -> forecast with the truth's variables; an ensemble has ``member_dim``.
        metrics_: Registry names (default: all of :data:`REGISTRY`); a score whose needs the data does not meet
            (no time dim; no periods) is left out and listed in the table's ``attrs["skipped"]``.
        member_dim, time_dim: Dim names.
        reference, future: ``(start, end)`` periods of the change-signal scores.
        progress: Show a progress bar over (variable, metric) pairs (tqdm).

    Returns:
        One row per (method, variable, metric): ``value`` (for a ``"field"`` score of an ensemble, the mean over
        its members) and ``member_spread`` (their standard deviation; 0 for one realisation); ``ideal`` and
        ``units`` of the metric.
    """
    names = list(metrics_ or DEFAULT)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise KeyError(f"Unknown metric(s) {unknown}; registered: {sorted(REGISTRY)}.")
    if isinstance(truth, xr.DataArray):
        truth = truth.to_dataset(name=truth.name or "field")
        forecasts = {k: (f.to_dataset(name=next(iter(truth.data_vars))) if isinstance(f, xr.DataArray) else f)
                     for k, f in forecasts.items()}
    ctx = _Context(member_dim, time_dim, {"reference": reference, "future": future} if reference and future else {})
    from tqdm.auto import tqdm

    rows, skipped = [], {}
    bar = tqdm(total=len(truth.data_vars) * len(names), desc="scores", disable=not progress)
    for var in truth.data_vars:
        y = truth[var]
        for name in names:
            bar.update()
            m = REGISTRY[name]
            why = ctx.missing(m, y)
            if why:
                skipped[name] = why
                continue
            for method, fc in forecasts.items():
                f = fc[var]
                ens = member_dim in f.dims and f.sizes[member_dim] > 1
                if m.kind == "ensemble" and not ens:
                    continue
                kw = {"member_dim": member_dim, "time_dim": time_dim, **ctx.periods}
                if m.kind == "ensemble":
                    values = [m.fn(f, y, **kw)]
                else:
                    parts = [f.isel({member_dim: i}) for i in range(f.sizes[member_dim])] if member_dim in f.dims \
                        else [f]
                    values = [m.fn(p, y, **kw) for p in parts]
                rows.append({"method": method, "variable": str(var), "metric": name, "value": float(np.mean(values)),
                             "member_spread": float(np.std(values)), "members": len(values) if m.kind == "field"
                             else f.sizes[member_dim], "ideal": m.ideal,
                             "units": str(y.attrs.get("units", "")) if m.units == "variable" else m.units})
    bar.close()
    table = pd.DataFrame(rows, columns=["method", "variable", "metric", "value", "member_spread", "members", "ideal",
                                        "units"])
    table.attrs["skipped"] = skipped
    return table


def markdown_table(table: pd.DataFrame, variable: str, metrics_: Sequence[str] | None = None,
                   floatfmt: str = ".3g") -> str:
    """One variable's rows of :func:`score` as a Markdown table (methods x metrics); a member-wise score of an
    ensemble reads ``mean ± spread`` across its members."""
    t = table[table.variable == variable]
    cols = [m for m in (metrics_ or dict.fromkeys(t.metric)) if m in set(t.metric)]
    head = "| method | " + " | ".join(f"{c} ({t[t.metric == c].units.iloc[0]})" for c in cols) + " |"
    out = [head, "|---|" + "---|" * len(cols)]
    for method in dict.fromkeys(t.method):
        cells = []
        for c in cols:
            r = t[(t.method == method) & (t.metric == c)]
            if r.empty:
                cells.append("–")
                continue
            v, s = float(r.value.iloc[0]), float(r.member_spread.iloc[0])
            cells.append(f"{v:{floatfmt}}" + (f" ± {s:.2g}" if s > 0 else ""))
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(out)
