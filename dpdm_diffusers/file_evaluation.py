"""Score any model on any paired files: ``dpdm evaluate --truth FILES``.

One job: from "a model and my high-res files" (plus, optionally, a real low-res source) to the tables a climate
scientist reads, per variable and in its own units:

* the paper's Table 1 (RMSE, ACC, SSIM, PSNR) plus CRPS and spread-skill, for interpolation (bilinear, bicubic), the
  regression stage of a two-stage model, one member and the means of 10 and 33 members (:func:`metrics.score_table`);
* rank-histogram reliability of the ensemble;
* the distribution of every variable: 1st/5th/95th/99th percentile biases and the Wasserstein distance;
* for precipitation-like variables: the wet fraction at several thresholds, the 95th and 99th percentiles, the
  total and negative values (:mod:`field_statistics`);
* the cross-variable consistency of the fine-scale detail (e.g. 2t-tp, 10u-10v), truth vs members;
* the climate scores of :mod:`climate_scores` (tails, RALSD, persistence, interannual variability, the change signal
  between two periods, twCRPS and Brier scores), each member against the truth with the spread across members;
* for daily data, the ETCCDI indices of :mod:`climate_indices` (xclim).

:func:`score_fields` does the scoring of forecasts made any way (the five-variable benchmark scores per-variable
models with it); :func:`evaluate_files` loads the files, runs the model and calls it; :func:`evaluate_forecast_files`
scores forecasts already on disk (e.g. written by ``dpdm downscale``) with baselines from the same coarse input, and
:func:`write_figures` draws spectra, quantile-quantile plots, rank histograms and bias maps.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from . import climate_scores, field_statistics, metrics
from .grids import Grid, grid_dims

__all__ = ["FieldScores", "evaluate_files", "evaluate_forecast_files", "forecasts_from_pipeline", "load_forecasts",
           "score_fields", "write_figures", "write_scores"]

TABLE1 = ["RMSE", "ACC", "SSIM", "PSNR", "CRPS", "SSR"]
# pairs of variables whose fine-scale detail is physically linked (when both are present)
CONSISTENCY_PAIRS = (("2t", "tp"), ("10u", "10v"), ("2t", "sp"), ("tas", "pr"), ("uas", "vas"), ("t2m", "tp"),
                     ("u10", "v10"))


@dataclass
class FieldScores:
    """What :func:`score_fields` returns: tidy tables plus a Markdown report."""

    table: pd.DataFrame  # method, region, variable, metric, value (metrics.score_table)
    reliability: dict  # method -> variable -> {"reliability_index", "outside_fraction"}
    precipitation: dict  # variable -> rows of field_statistics.precipitation_rows
    consistency: list  # rows {"pair", "method", "correlation"}
    units: dict
    notes: list = field(default_factory=list)
    distribution: dict = field(default_factory=dict)  # variable -> rows of field_statistics.distribution_rows
    climate: pd.DataFrame | None = None  # climate_scores.score
    indices: list = field(default_factory=list)  # rows of climate_indices.index_scores

    def ratio(self, method: str, reference: str, variable: str, metric: str = "RMSE") -> float:
        """``method``'s score over ``reference``'s (e.g. RMSE of the 33-member mean over bicubic's)."""
        t = self.table
        pick = lambda m: float(t[(t.method == m) & (t.variable == variable) & (t.metric == metric)].value.iloc[0])  # noqa: E731
        return pick(method) / pick(reference)

    def markdown(self) -> str:
        out = ["Per variable, in its own units: " + ", ".join(f"{v} ({u})" for v, u in self.units.items()) + ".", "",
               "RMSE / ACC / SSIM / PSNR / CRPS / spread-skill (the paper's Table 1 plus CRPS, SSR; ensembles: "
               "the mean's RMSE/ACC/SSIM/PSNR, the members' CRPS and SSR; deterministic rows: CRPS = MAE):", "",
               metrics.to_markdown(self.table, metrics=TABLE1, style="table1")]
        if self.reliability:
            out += ["", "Rank-histogram reliability index (0 = flat) and fraction of the truth outside the ensemble:",
                    "", "| method | " + " | ".join(self.units) + " |", "|---|" + "---|" * len(self.units)]
            for m, per in self.reliability.items():
                cells = [f"{per[v]['reliability_index']:.3f} / {per[v]['outside_fraction']:.3f}" if v in per else "–"
                         for v in self.units]
                out.append(f"| {m} | " + " | ".join(cells) + " |")
        if self.distribution:
            methods = [r["method"] for r in next(iter(self.distribution.values()))]
            out += ["", "Distributions (every point and member pooled; each variable in its units): 1st / 99th "
                    "percentile bias and the Wasserstein distance to the truth:", "",
                    "| method | " + " | ".join(self.distribution) + " |", "|---|" + "---|" * len(self.distribution)]
            for i, m in enumerate(methods):
                cells = [f"{rows[i]['q1']:+.3g} / {rows[i]['q99']:+.3g} / {rows[i]['wasserstein']:.3g}"
                         for rows in self.distribution.values()]
                out.append(f"| {m} | " + " | ".join(cells) + " |")
        for v, rows in self.precipitation.items():
            keys = [k for k in rows[0] if k != "method"]
            # ratios of the lowest wet threshold, the 99th percentile and the total (the truth's row is 1 by definition)
            ratio_keys = [next(k for k in keys if k.startswith("wet>=")), "p99", "mean"]
            out += ["", f"Precipitation `{v}` ({self.units[v]}; ensembles pooled over members; ratios to the truth "
                    "in the last columns):", "",
                    "| method | " + " | ".join(keys) + " | " + " | ".join(f"{k}/truth" for k in ratio_keys)
                    + " |", "|---|" + "---|" * (len(keys) + len(ratio_keys))]
            for r in rows:
                ratios = [f"{r[k + '/truth']:.3f}" if r["method"] != "truth" else "1.000" for k in ratio_keys]
                out.append(f"| {r['method']} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " | " + " | ".join(ratios)
                           + " |")
        if self.consistency:
            pairs = list(dict.fromkeys(r["pair"] for r in self.consistency))
            methods = list(dict.fromkeys(r["method"] for r in self.consistency))
            val = {(r["pair"], r["method"]): r["correlation"] for r in self.consistency}
            out += ["", "Cross-variable consistency: correlation of the fine-scale anomalies (each field minus its own "
                    "coarse block mean; members pooled):", "", "| method | " + " | ".join(pairs) + " |",
                    "|---|" + "---|" * len(pairs)]
            for m in methods:
                out.append(f"| {m} | " + " | ".join(f"{val.get((p, m), float('nan')):.3f}" for p in pairs) + " |")
            timed = {(r["pair"], r["method"]): r for r in self.consistency if "time_correlation" in r}
            if timed:
                out += ["", "Correlation over time at each point (mean over points; members one by one, mean ± "
                        "spread), and its bias against the truth's:", "", "| method | " + " | ".join(pairs) + " |",
                        "|---|" + "---|" * len(pairs)]
                for m in methods:
                    cells = []
                    for p in pairs:
                        r = timed.get((p, m))
                        cells.append("–" if r is None else f"{r['time_correlation']:.3f}" + (
                            f" ± {r['time_correlation_spread']:.2g} (bias {r['time_correlation_bias']:+.3f})"
                            if "time_correlation_bias" in r else ""))
                    out.append(f"| {m} | " + " | ".join(cells) + " |")
        if self.climate is not None and not self.climate.empty:
            from .climate_scores import markdown_table

            out += ["", "Climate scores (member-wise scores: mean over members ± their spread; ideal 0 except ratios, "
                    "ideal 1):"]
            for v in self.units:
                out += ["", f"`{v}`:", "", markdown_table(self.climate, v)]
            skipped = self.climate.attrs.get("skipped") or {}
            if skipped:
                out += ["", "Not computed: " + "; ".join(f"{k} ({why})" for k, why in skipped.items()) + "."]
        if self.indices:
            out += ["", "ETCCDI indices (xclim; the truth's percentile thresholds): the truth's mean, each member's "
                    "bias (mean ± spread across members), ratio to the truth and the index's spread across members:",
                    "", "| index | method | truth | bias | ratio | spread across members |", "|---|---|---|---|---|---|"]
            for r in self.indices:
                out.append(f"| {r['index']} | {r['method']} | {r['truth']:.4g} | {r['mean_bias']:+.3g} ± "
                           f"{r['member_bias_spread']:.2g} | {r['ratio']:.3f} | {r['member_index_spread']:.3g} |")
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)

    def to_json(self) -> dict:
        return {"table": self.table.to_dict(orient="records"), "reliability": self.reliability,
                "distribution": self.distribution, "precipitation": self.precipitation,
                "consistency": self.consistency, "units": self.units, "notes": self.notes,
                "climate": [] if self.climate is None else self.climate.to_dict(orient="records"),
                "indices": self.indices}


def _ensembles(forecasts: Mapping[str, xr.Dataset], members_dim: str) -> dict[str, xr.Dataset]:
    return {k: f for k, f in forecasts.items() if members_dim in f.dims and f.sizes[members_dim] > 1}


def score_fields(truth: xr.Dataset, forecasts: Mapping[str, xr.Dataset], *, scale_factor: int,
                 precipitation: Sequence[str] = (), wet_thresholds: Sequence[float] =
                 field_statistics.DEFAULT_WET_THRESHOLDS, members_dim: str = "member",
                 consistency_pairs: Sequence[tuple[str, str]] | None = None, seed: int = 0,
                 climate_metrics: Sequence[str] | None = None, periods: tuple | None = None,
                 index_freq: str = "YS", progress: bool = False) -> FieldScores:
    """Score ``forecasts`` (name -> Dataset with the truth's variables; ensembles carry ``members_dim``) against
    ``truth``. ``precipitation``: the variables that get the distribution table. ``climate_metrics``: registry names
    of :mod:`climate_scores` (default: all that the data supports); ``periods``: ``(reference, future)`` of the
    change signal; ``index_freq``: the period of the ETCCDI indices (daily data only)."""
    variables = [str(v) for v in truth.data_vars]
    table = metrics.score_table(truth, forecasts, regions={"all": None}, members_dim=members_dim, metrics=TABLE1)
    reliability = {}
    for name, ens in _ensembles(forecasts, members_dim).items():
        per = {}
        for v in variables:
            hist = metrics.rank_histogram(ens[v], truth[v], members_dim=members_dim, seed=seed)
            per[v] = {"reliability_index": float(metrics.reliability_index(hist)),
                      "outside_fraction": float(metrics.outside_fraction(hist))}
        reliability[name] = per
    precip = {v: field_statistics.precipitation_rows(truth[v], {k: f[v] for k, f in forecasts.items()},
                                                     wet_thresholds, members_dim)
              for v in precipitation if v in variables}
    consistency = []
    timed = "time" in truth.dims and truth.sizes["time"] >= 3
    fine = scale_factor > 1
    if consistency_pairs is None:
        consistency_pairs = [p for p in CONSISTENCY_PAIRS if set(p) <= set(variables)] if fine or timed else []
    for a, b in consistency_pairs:
        row = {"pair": f"{a}-{b}", "method": "truth",
               "correlation": field_statistics.fine_scale_correlation(truth, a, b, scale_factor) if fine
               else float("nan")}
        if timed:  # the link over time at each point (e.g. hot and dry together), members one by one
            ref = climate_scores.intervariable_correlation_members(truth, a, b)[0]
            row["time_correlation"] = ref
        consistency.append(row)
        for name, f in forecasts.items():
            row = {"pair": f"{a}-{b}", "method": name,
                   "correlation": field_statistics.fine_scale_correlation(f, a, b, scale_factor, members_dim) if fine
                   else float("nan")}
            if timed:
                per = climate_scores.intervariable_correlation_members(f, a, b, member_dim=members_dim)
                row.update(time_correlation=float(np.mean(per)), time_correlation_bias=float(np.mean(per)) - ref,
                           time_correlation_spread=float(np.std(per)))
            consistency.append(row)
    distribution = {v: field_statistics.distribution_rows(truth[v], {k: f[v] for k, f in forecasts.items()})
                    for v in variables}
    units = {v: str(truth[v].attrs.get("units", "")) for v in variables}
    notes = [table.attrs.get("notes", "")]
    reference, future = periods or (None, None)
    climate = climate_scores.score(truth, forecasts, climate_metrics, member_dim=members_dim, reference=reference,
                                   future=future, progress=progress)
    indices = daily_indices(truth, forecasts, index_freq, members_dim)
    if not [d for d in truth.dims if d not in grid_dims(truth)]:
        notes.append("One truth field: ACC is its centred pattern correlation (anomalies against zero).")
    return FieldScores(table, reliability, precip, consistency, units, notes, distribution, climate, indices)


def daily_indices(truth: xr.Dataset, forecasts: Mapping[str, xr.Dataset], freq: str = "YS",
                  members_dim: str = "member") -> list[dict]:
    """The ETCCDI indices that the variables allow (precipitation, temperature), when the data is daily."""
    from . import climate_indices as ci

    roles = ci.roles(truth)
    if not roles or not ci.is_daily(truth[next(iter(roles.values()))]):
        return []
    def fields(ds):
        return {r: ds[v] for r, v in roles.items()}

    rows = []
    for index in ci.indices_for(list(roles)):
        rows += ci.index_scores(index, fields(truth), {k: fields(f) for k, f in forecasts.items()}, freq, members_dim)
    return rows


def forecasts_from_pipeline(pipe, low_res: xr.Dataset, static, *, members: Sequence[int] = (1, 10),
                            num_inference_steps: int = 10, seed: int = 0, label: str = "model",
                            baselines: Sequence[str] = ("bilinear", "bicubic", "regression")) -> dict[str, xr.Dataset]:
    """Interpolation baselines, the regression stage and ensembles of ``members`` sizes (the first ``n`` members of
    one run of ``max(members)``: members are independent of the ensemble size)."""
    import torch

    from .data import regrid
    from .grids import Grid

    out: dict[str, xr.Dataset] = {}
    variables = list(pipe.config.variables)
    target = Grid.from_xarray(low_res).refine(pipe.config.scale_factor)
    for b in baselines:
        if b in ("bilinear", "bicubic"):
            out[b] = regrid(low_res[variables], target, method=b)
        elif b == "regression" and pipe.regression_unet is not None:
            out["regression stage"] = pipe.regression_pipeline()(low_res, static_fields=static).mean
        elif b != "regression":
            raise ValueError(f"Unknown baseline {b!r}; use bilinear, bicubic, regression.")
    ens = pipe(low_res, static_fields=static, num_members=max(members), num_inference_steps=num_inference_steps,
               generator=torch.Generator().manual_seed(seed)).members
    for n in sorted(members):
        sub = ens.isel(member=slice(0, n))
        out[f"{label}, 1 member" if n == 1 else f"{label}, {n} members"] = sub.isel(member=0) if n == 1 else sub
    return out


def evaluate_files(model: str, truth_files: Sequence[str], *, low_res: Sequence[str] = (), variable_map=None,
                   units: Mapping[str, str] | None = None, static_files: Mapping[str, str] | None = None,
                   static_map: Mapping[str, str] | None = None, regular_grid: bool = False, lat_box=None,
                   lon_box=None, time=None, members: Sequence[int] = (1, 10), num_inference_steps: int = 10,
                   seed: int = 0, wet_thresholds: Sequence[float] = field_statistics.DEFAULT_WET_THRESHOLDS,
                   baselines: Sequence[str] = ("bilinear", "bicubic", "regression"),
                   scheduler: str | None = None) -> FieldScores:
    """Load paired files (the truth, and block means of it unless ``low_res`` is given), downscale with ``model``
    (with ``scheduler``, a short name of :func:`evaluation.set_scheduler`, or its saved one) and :func:`score_fields`
    the result. Options as for :func:`dpdm_diffusers.user_data.load_region`."""
    from . import DownscalingPipeline
    from .transforms import NON_NEGATIVE_TRANSFORMS
    from .user_data import load_region

    pipe = DownscalingPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        from .evaluation import set_scheduler

        set_scheduler(pipe, scheduler)
    cfg = pipe.config
    with warnings.catch_warnings():  # "no validation split": scoring needs none
        warnings.simplefilter("ignore", UserWarning)
        region = load_region(
            list(truth_files), low_res=list(low_res) or None, scale_factor=cfg.scale_factor,
            variables=list(cfg.variables), variable_map=variable_map, units=dict(zip(cfg.variables, cfg.units)),
            declared_units=units, lat_box=lat_box, lon_box=lon_box, regular_grid=regular_grid,
            static_channels=list(cfg.static_channels), static_files=static_files, static_map=static_map,
            train_time=time)
    pairs = region.pairs.sel(**region.train) if region.train else region.pairs
    low, truth = pairs.low_res.load(), pairs.high_res[list(cfg.variables)].load()
    forecasts = forecasts_from_pipeline(pipe, low, region.static, members=members,
                                        num_inference_steps=num_inference_steps, seed=seed,
                                        label=Path(str(model)).name or "model", baselines=baselines)
    precip = [v for v, t in zip(cfg.variables, cfg.transforms) if t in NON_NEGATIVE_TRANSFORMS]
    scores = score_fields(truth, forecasts, scale_factor=cfg.scale_factor, precipitation=precip,
                          wet_thresholds=wet_thresholds, seed=seed)
    scores.notes.append(f"{model} on {', '.join(map(str, truth_files))}: "
                        + ", ".join(f"{k} {v}" for k, v in region.describe.items() if k in ("low_res", "grid")))
    return scores


def write_scores(scores: FieldScores, out_dir: str | Path, name: str, command: str | None = None) -> Path:
    """``<name>.md`` (with the command that made it) and ``<name>.json`` in ``out_dir``; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = scores.markdown() + (f"\n\nCommand: `{command}`\n" if command else "\n")
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(scores.to_json(), indent=1, default=float))
    return out / f"{name}.md"



def _named(spec: str) -> tuple[str, str]:
    """``"name=path"`` or ``"path"`` (named by the file's stem)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name.strip(), path.strip()
    return Path(spec.rstrip("/")).stem, spec


def load_forecasts(specs: Sequence[str], truth: xr.Dataset,
                   variable_map: Mapping[str, str] | None = None) -> dict[str, xr.Dataset]:
    """Open forecast files (``name=path``; e.g. the output of ``dpdm downscale``) on the truth's grid and times.

    Each keeps the truth's variables (``variable_map``: forecast name -> truth name) and the time steps it shares
    with the truth. A forecast on another grid, without a variable or sharing no time step is refused by name."""
    from .data import open_dataset

    out = {}
    for spec in specs:
        name, path = _named(spec)
        ds = open_dataset(path)
        if variable_map:
            ds = ds.rename({k: v for k, v in variable_map.items() if k in ds})
        missing = [v for v in truth.data_vars if v not in ds]
        if missing:
            raise ValueError(f"Forecast {name!r} ({path}) has no variable {missing}; it has {sorted(ds.data_vars)}. "
                             "Map names with --variable forecast_name=truth_name.")
        ds = ds[list(truth.data_vars)]
        ya, xa = grid_dims(truth)  # lat/lon, or a rotated or projected grid's y/x
        if grid_dims(ds) != (ya, xa):
            raise ValueError(f"Forecast {name!r} ({path}) is on a {Grid.from_xarray(ds).describe()}, the truth on a "
                             f"{Grid.from_xarray(truth).describe()}. Regrid one onto the other first.")
        try:  # a forecast over a larger domain is cut to the truth's region (e.g. --lat-box)
            ds = ds.sel({ya: truth[ya].values, xa: truth[xa].values}, method="nearest", tolerance=1e-4)
        except KeyError:
            pass  # reported below, with both grids
        for dim in (ya, xa):
            if ds.sizes.get(dim) != truth.sizes[dim] or not np.allclose(ds[dim].values, truth[dim].values, atol=1e-4):
                raise ValueError(f"Forecast {name!r} ({path}) is not on the truth's grid: its {dim} has "
                                 f"{ds.sizes.get(dim)} points from {float(ds[dim].min()):g} to {float(ds[dim].max()):g}"
                                 f", the truth's {truth.sizes[dim]} from {float(truth[dim].min()):g} to "
                                 f"{float(truth[dim].max()):g}. Regrid one onto the other first.")
        ds = ds.assign_coords({ya: truth[ya], xa: truth[xa]})
        if "time" in truth.dims:
            if "time" not in ds.dims:
                raise ValueError(f"Forecast {name!r} ({path}) has no time dim; the truth has {truth.sizes['time']}.")
            common = np.intersect1d(ds.time.values, truth.time.values)
            if common.size == 0:
                raise ValueError(f"Forecast {name!r} ({path}) shares no time step with the truth.")
            ds = ds.sel(time=common)
        out[name] = ds.load()
    return out


def evaluate_forecast_files(truth_files: Sequence[str], forecast_specs: Sequence[str], *,
                            low_res: Sequence[str] = (), baselines: Sequence[str] = ("bilinear", "bicubic"),
                            variable_map: Mapping[str, str] | None = None, lat_box=None, lon_box=None, time=None,
                            periods: tuple | None = None, climate_metrics: Sequence[str] | None = None,
                            index_freq: str = "YS", wet_thresholds: Sequence[float] =
                            field_statistics.DEFAULT_WET_THRESHOLDS, seed: int = 0,
                            progress: bool = True) -> tuple[FieldScores, xr.Dataset, dict[str, xr.Dataset]]:
    """Score forecasts already on disk against the truth; no model is run.

    Args:
        truth_files: The high-res truth (netCDF/zarr, globs allowed).
        forecast_specs: ``name=path`` (or a path) per forecast; ensembles carry a ``member`` dim.
        low_res: The coarse input the forecasts were made from; ``baselines`` are interpolated from it onto the
            truth's grid, and its grid ratio gives the fine-scale consistency scores.
        variable_map: Forecast variable name -> truth variable name.
        lat_box, lon_box, time: Region and period to score (``(start, end)`` pairs).
        periods: ``(reference, future)`` for the change signal, e.g. ``(("1961", "1990"), ("2070", "2099"))``.
        climate_metrics: Registry names of :mod:`climate_scores` (default all that the data allows).
        index_freq: Period of the ETCCDI indices of daily data (``"YS"``, ``"QS-DEC"``...).

    Returns:
        The scores, and the truth and forecasts as scored (for :func:`write_figures`).
    """
    from .data import open_dataset, regrid
    from .statistics import default_transform

    truth = open_dataset(list(truth_files), time=time, lat=lat_box, lon=lon_box).load()
    forecasts: dict[str, xr.Dataset] = {}
    scale = 0
    if low_res:
        low = open_dataset(list(low_res), variables=list(truth.data_vars), time=time).load()
        if "time" in truth.dims:
            low = low.sel(time=np.intersect1d(low.time.values, truth.time.values))
        grid = Grid.from_xarray(truth)
        for b in baselines:
            forecasts[b] = regrid(low, grid, method=b)[list(truth.data_vars)]
        ya = grid_dims(truth)[0]
        scale = int(round(float(np.diff(low[ya].values).mean() / np.diff(truth[ya].values).mean())))
    elif baselines and tuple(baselines) != ("bilinear", "bicubic"):
        raise ValueError("Baselines are interpolated from the coarse input: give it with --low-res.")
    forecasts.update(load_forecasts(forecast_specs, truth, variable_map))
    if "time" in truth.dims:
        common = truth.time.values
        for f in forecasts.values():
            common = np.intersect1d(common, f.time.values)
        truth = truth.sel(time=common)
        forecasts = {k: f.sel(time=common) for k, f in forecasts.items()}
    precip = [v for v in truth.data_vars if default_transform(str(v), truth[v].attrs) == "log1p"]
    scores = score_fields(truth, forecasts, scale_factor=scale, precipitation=precip, wet_thresholds=wet_thresholds,
                          seed=seed, climate_metrics=climate_metrics,
                          periods=periods, index_freq=index_freq, progress=progress)
    scores.notes.append("Files: truth " + ", ".join(map(str, truth_files)) + "; forecasts "
                        + ", ".join(forecast_specs) + (f"; low-res {', '.join(low_res)}" if low_res else ""))
    return scores, truth, forecasts


def write_figures(truth: xr.Dataset, forecasts: Mapping[str, xr.Dataset], out_dir: str | Path, name: str = "scores",
                  members_dim: str = "member") -> list[Path]:
    """Per variable: power spectra (members pooled), a quantile-quantile plot, the rank histograms of the
    ensembles, and maps of the bias of the time mean and of the 99th percentile at each point (members pooled)."""
    from . import plots

    out, paths = Path(out_dir), []
    out.mkdir(parents=True, exist_ok=True)
    for v in truth.data_vars:
        units = str(truth[v].attrs.get("units", ""))
        spectra = {"truth": metrics.power_spectrum(truth[v])}
        spectra.update({k: metrics.power_spectrum(f[v]) for k, f in forecasts.items()})
        paths.append(plots.plot_power_spectra(spectra, out / f"{name}_{v}_spectra.png", title=f"{v}: power spectra"))
        paths.append(plots.plot_quantiles(truth[v].values, {k: f[v].values for k, f in forecasts.items()},
                                          out / f"{name}_{v}_qq.png", title=f"{v}: quantiles", units=units))
        ens = _ensembles(forecasts, members_dim)
        if ens:
            hists = {k: metrics.rank_histogram(f[v], truth[v], members_dim=members_dim).values for k, f in ens.items()}
            paths.append(plots.plot_rank_histograms(hists, out / f"{name}_{v}_rank.png", title=f"{v}: rank histograms"))
        spatial = grid_dims(truth[v])
        pooled = [d for d in truth[v].dims if d not in spatial]
        maps = {}
        for k, f in forecasts.items():
            dims = [d for d in f[v].dims if d not in spatial]
            maps[f"{k}: mean bias"] = f[v].mean(dims) - truth[v].mean(pooled)
            if pooled:
                maps[f"{k}: 99th pct bias"] = f[v].quantile(0.99, dims).drop_vars("quantile") \
                    - truth[v].quantile(0.99, pooled).drop_vars("quantile")
        paths.append(plots.plot_bias_maps(maps, out / f"{name}_{v}_bias_maps.png", title=f"{v}: bias per point",
                                          units=units))
    return paths
