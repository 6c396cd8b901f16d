"""Score any model on any paired files: ``dpdm evaluate --truth FILES``.

One job: from "a model and my high-res files" (plus, optionally, a real low-res source) to the tables a climate
scientist reads, per variable and in its own units:

* the paper's Table 1 (RMSE, ACC, SSIM, PSNR) plus CRPS and spread-skill, for interpolation (bilinear, bicubic), the
  regression stage of a two-stage model, one member and the means of 10 and 33 members (:func:`metrics.score_table`);
* rank-histogram reliability of the ensemble;
* the distribution of every variable: 1st/5th/95th/99th percentile biases and the Wasserstein distance;
* for precipitation-like variables: the wet fraction at several thresholds, the 95th and 99th percentiles, the
  total and negative values (:mod:`field_statistics`);
* the cross-variable consistency of the fine-scale detail (e.g. 2t-tp, 10u-10v), truth vs members.

:func:`score_fields` does the scoring of forecasts made any way (the five-variable benchmark scores per-variable
models with it); :func:`evaluate_files` loads the files, runs the model and calls it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import xarray as xr

from . import field_statistics, metrics

__all__ = ["FieldScores", "evaluate_files", "forecasts_from_pipeline", "score_fields", "write_scores"]

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
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)

    def to_json(self) -> dict:
        return {"table": self.table.to_dict(orient="records"), "reliability": self.reliability,
                "distribution": self.distribution, "precipitation": self.precipitation,
                "consistency": self.consistency, "units": self.units, "notes": self.notes}


def _ensembles(forecasts: Mapping[str, xr.Dataset], members_dim: str) -> dict[str, xr.Dataset]:
    return {k: f for k, f in forecasts.items() if members_dim in f.dims and f.sizes[members_dim] > 1}


def score_fields(truth: xr.Dataset, forecasts: Mapping[str, xr.Dataset], *, scale_factor: int,
                 precipitation: Sequence[str] = (), wet_thresholds: Sequence[float] =
                 field_statistics.DEFAULT_WET_THRESHOLDS, members_dim: str = "member",
                 consistency_pairs: Sequence[tuple[str, str]] | None = None, seed: int = 0) -> FieldScores:
    """Score ``forecasts`` (name -> Dataset with the truth's variables; ensembles carry ``members_dim``) against
    ``truth``. ``precipitation``: the variables that get the distribution table."""
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
    if consistency_pairs is None:
        consistency_pairs = [p for p in CONSISTENCY_PAIRS if set(p) <= set(variables)]
    consistency = []
    for a, b in consistency_pairs:
        consistency.append({"pair": f"{a}-{b}", "method": "truth",
                            "correlation": field_statistics.fine_scale_correlation(truth, a, b, scale_factor)})
        for name, f in forecasts.items():
            consistency.append({"pair": f"{a}-{b}", "method": name, "correlation":
                                field_statistics.fine_scale_correlation(f, a, b, scale_factor, members_dim)})
    distribution = {v: field_statistics.distribution_rows(truth[v], {k: f[v] for k, f in forecasts.items()})
                    for v in variables}
    units = {v: str(truth[v].attrs.get("units", "")) for v in variables}
    notes = [table.attrs.get("notes", "")]
    if not [d for d in truth.dims if d not in ("lat", "lon")]:
        notes.append("One truth field: ACC is its centred pattern correlation (anomalies against zero).")
    return FieldScores(table, reliability, precip, consistency, units, notes, distribution)


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

