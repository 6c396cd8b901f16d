"""Climate-change signal and year-to-year persistence of a fine-tuned regional model on HadCM3 (E1 and A1B).

    # the fine-tuned model (about 12 CPU-minutes here): what the README's "bring your own region" recipe runs
    dpdm finetune $(python -c "import iris_sample_data,os;print(os.path.join(os.path.dirname(iris_sample_data.__file__),'sample_data','E1_north_america.nc'))") \
        -o runs/climate/hadcm3-1860-1950 --variable air_temperature=surface_temperature \
        --train-time 1860,1950 --validation-time 1951,1960 --steps 600 --regression-steps 600 --learning-rate 0.0002
    python benchmarks/climate_signal.py --model runs/climate/hadcm3-1860-1950        # about 10 CPU-minutes

Data: HadCM3 1.5 m air temperature (iris-sample-data, yearly means, 1.25 x 1.875 deg) over North America, the
36 x 48-point crop, input = 4 x 4 block means. Both scenarios share their history up to 1999; the model is fine-tuned
on E1 1860-1950 and validated (spread calibration) on E1 1951-1960, so every scored year is unseen: the reference
period 1961-1990 and the future period 2070-2099 of E1 (a low-emission scenario) and A1B (a warmer one).

For the truth, Lerp (bilinear), bicubic, the fine-tuned regression stage and the ensemble (members independent in
time, the default, and members with noise correlated in time, `noise_time_correlation`), per scenario:

* the change signal (2070-2099 mean minus 1961-1990 mean) per grid point: its domain mean and the bias and RMS
  over points of the forecast's signal minus the truth's (an ensemble: each member's signal);
* the lag-1 autocorrelation of each member's detrended annual anomaly series against the truth's, and the
  interannual variability ratio, within each period (the mean of the two);
* the same lag-1 autocorrelation of the fine-scale residual (field minus the regression stage's mean), which is the
  part of a member that its noise draws: the truth's residual is persistent, independent noise is not;
* the 1st/99th percentile biases, the Wasserstein distance (all points, and per point over time), RMSE and CRPS.

Writes benchmarks/results/climate_signal.{md,json} and climate_signal_maps.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
REFERENCE, FUTURE = ("1961", "1990"), ("2070", "2099")
VAR = "air_temperature"
PERIOD_METRICS = ["lag1_autocorrelation_bias", "interannual_variability_ratio", "wasserstein_per_point"]
ALL_METRICS = ["change_signal_bias", "change_signal_bias_rms", "q1_bias", "q99_bias", "wasserstein", "RMSE", "CRPS"]


def sample_file(name: str) -> str:
    import iris_sample_data

    return os.path.join(os.path.dirname(iris_sample_data.__file__), "sample_data", name)


def load_scenario(name: str) -> xr.Dataset:
    from dpdm_diffusers.data import open_dataset, trim_to_multiple

    ds = open_dataset(sample_file(f"{name}_north_america.nc"), variables=[VAR])
    both = xr.concat([ds.sel(time=slice(*REFERENCE)), ds.sel(time=slice(*FUTURE))], dim="time")
    return trim_to_multiple(both, 4).load()


def training_residual_persistence(pipe) -> float:
    """What training registers as the model's ``noise_time_correlation`` (`training.stages.
    measure_noise_time_correlation`), measured on the fine-tuning years (E1 1860-1950): the `auto` correlation. (The
    model here was fine-tuned before training measured it, so it is measured again the same way.)"""
    from dpdm_diffusers.data import PairedData, coarsen, open_dataset, trim_to_multiple
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.static_fields import get_static_fields
    from dpdm_diffusers.training.stages import measure_noise_time_correlation
    from dpdm_diffusers.user_data import RegionData

    truth = trim_to_multiple(open_dataset(sample_file("E1_north_america.nc"), variables=[VAR],
                                          time=("1860", "1950")), 4).load().rename({VAR: "surface_temperature"})
    static = get_static_fields(Grid.from_xarray(truth), list(pipe.config.static_channels))
    region = RegionData(pairs=PairedData(truth, coarsen(truth, 4), 4), static=static, train={}, validation=None)
    return measure_noise_time_correlation(pipe, region)["measured"]


def forecasts(pipe, truth: xr.Dataset, members: int, steps: int, correlations, timings: dict, scenario: str) -> dict:
    import torch

    from dpdm_diffusers.data import coarsen, regrid
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.static_fields import get_static_fields

    low = coarsen(truth, 4)
    grid = Grid.from_xarray(truth)
    static = get_static_fields(grid, list(pipe.config.static_channels))
    kw = dict(static_fields=static, variable_map={VAR: "surface_temperature"})
    out = {"Lerp (bilinear)": regrid(low, grid, "bilinear")[VAR], "Bicubic": regrid(low, grid, "bicubic")[VAR]}
    out["Regression stage"] = pipe.regression_pipeline()(low, **kw).mean[VAR]
    for rho in correlations:
        t0 = time.perf_counter()
        ens = pipe(low, num_members=members, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                   noise_time_correlation=rho, **kw).members[VAR]
        timings[f"{scenario} rho={rho}"] = time.perf_counter() - t0
        out[ensemble_label(members, rho)] = ens
    return out


def ensemble_label(members: int, rho: float) -> str:
    return f"{members} members, " + ("independent in time" if rho == 0 else f"noise correlated in time (rho {rho:g})")


def residual_persistence(fc: xr.DataArray, truth: xr.DataArray, regression: xr.DataArray) -> tuple[float, float]:
    """Mean lag-1 autocorrelation of (field - regression mean) in each period, forecast and truth."""
    from dpdm_diffusers.climate_scores import lag1_autocorrelation

    f_ac, t_ac = [], []
    for period in (REFERENCE, FUTURE):
        sel = {"time": slice(*period)}
        f_ac.append(float(lag1_autocorrelation((fc - regression).sel(sel)).mean()))
        t_ac.append(float(lag1_autocorrelation((truth - regression).sel(sel)).mean()))
    return float(np.mean(f_ac)), float(np.mean(t_ac))


def score_scenario(truth: xr.DataArray, fcs: dict) -> list[dict]:
    from dpdm_diffusers import climate_scores as cs

    t_all = truth.to_dataset(name=VAR)
    f_all = {k: v.to_dataset(name=VAR) for k, v in fcs.items()}
    table = cs.score(t_all, f_all, ALL_METRICS, reference=REFERENCE, future=FUTURE)
    per_period = [cs.score(t_all.sel(time=slice(*p)), {k: v.sel(time=slice(*p)) for k, v in f_all.items()},
                           PERIOD_METRICS) for p in (REFERENCE, FUTURE)]
    truth_signal = cs.change_signal(truth, REFERENCE, FUTURE)
    truth_ac = [float(cs.lag1_autocorrelation(truth.sel(time=slice(*p))).mean()) for p in (REFERENCE, FUTURE)]
    rows = []
    for method, fc in fcs.items():
        row = {"method": method, "truth_signal": float(truth_signal.mean()), "truth_lag1": float(np.mean(truth_ac))}
        sig = cs.change_signal(fc, REFERENCE, FUTURE)
        row["signal"] = float(sig.mean())
        for r in table[table.method == method].itertuples():
            row[r.metric], row[r.metric + "_spread"] = r.value, r.member_spread
        for m in PERIOD_METRICS:
            vals = [float(t[(t.method == method) & (t.metric == m)].value.iloc[0]) for t in per_period]
            spreads = [float(t[(t.method == method) & (t.metric == m)].member_spread.iloc[0]) for t in per_period]
            row[m], row[m + "_spread"] = float(np.mean(vals)), float(np.mean(spreads))
        row["residual_lag1"], row["truth_residual_lag1"] = residual_persistence(fc, truth, fcs["Regression stage"])
        rows.append(row)
    return rows


def maps_figure(truth: xr.DataArray, fcs: dict, path: Path, members: int, rho: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpdm_diffusers import climate_scores as cs

    ens_label = ensemble_label(members, 0.0)
    signal = cs.change_signal(truth, REFERENCE, FUTURE)
    panels = [("truth: A1B change signal (K)", signal, "viridis", None)]
    for m in ("Bicubic", "Regression stage", ens_label):
        b = cs.change_signal_bias(fcs[m], truth, REFERENCE, FUTURE)
        b = b.mean("member") if "member" in b.dims else b
        panels.append((f"{m}: signal bias (K)", b, "RdBu_r", 0.5))
    ac_t = cs.lag1_autocorrelation(truth.sel(time=slice(*REFERENCE)))
    panels.append(("truth: lag-1 autocorrelation 1961-1990 (1)", ac_t, "PuOr", 1.0))
    ac_m = cs.lag1_autocorrelation(fcs[ens_label].sel(time=slice(*REFERENCE))).mean("member")
    panels.append(("members: mean of their lag-1 autocorrelations (1)", ac_m, "PuOr", 1.0))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (title, da, cmap, lim) in zip(axes.ravel(), panels):
        kw = {"vmin": -lim, "vmax": lim} if lim else {}
        da.plot(ax=ax, cmap=cmap, cbar_kwargs={"label": ""}, **kw)  # the title says what and in which units
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COLUMNS = [("signal", "change signal (K)", ".2f"), ("change_signal_bias", "signal bias (K)", "+.3f"),
           ("change_signal_bias_rms", "signal bias RMS (K)", ".3f"),
           ("lag1_autocorrelation_bias", "lag-1 AC bias", "+.3f"),
           ("interannual_variability_ratio", "interannual var. ratio", ".3f"),
           ("residual_lag1", "lag-1 AC of the fine-scale residual", ".3f"), ("q1_bias", "1st pct bias (K)", "+.3f"),
           ("q99_bias", "99th pct bias (K)", "+.3f"), ("wasserstein", "Wasserstein (K)", ".3f"),
           ("wasserstein_per_point", "Wasserstein per point (K)", ".3f"), ("RMSE", "RMSE (K)", ".3f"),
           ("CRPS", "CRPS (K)", ".3f")]


def findings(rows: list[dict]) -> list[str]:
    """What the table says, in words (read off the rows, never typed in)."""
    by = {r["method"]: r for r in rows}
    ens = [r for r in rows if "members" in r["method"]]
    indep, corr = ens[0], ens[-1]
    t = rows[0]
    out = [f"- Change signal: the members' domain mean is {indep['signal']:.2f} K against the truth's "
           f"{t['truth_signal']:.2f} K; per point, the RMS of the signal's bias is {indep['change_signal_bias_rms']:.3f} K "
           f"for the members, {by['Regression stage']['change_signal_bias_rms']:.3f} K for the regression stage and "
           f"{by['Bicubic']['change_signal_bias_rms']:.3f} K for bicubic interpolation.",
           f"- Persistence: members drawn independently each year have a lag-1 autocorrelation "
           f"{indep['lag1_autocorrelation_bias']:+.3f} off the truth's {t['truth_lag1']:.3f} "
           f"({100 * indep['lag1_autocorrelation_bias'] / t['truth_lag1']:+.0f}%)"]
    if corr is not indep:
        out[-1] += (f"; with {corr['method'].split(', ', 1)[1]} {corr['lag1_autocorrelation_bias']:+.3f}, RMSE "
                    f"{corr['RMSE']:.3f} K against {indep['RMSE']:.3f} K and CRPS {corr['CRPS']:.3f} K against "
                    f"{indep['CRPS']:.3f} K.")
    out.append(f"- Tails: the members' 99th percentile is {indep['q99_bias']:+.3f} K off the truth's and their 1st "
               f"{indep['q1_bias']:+.3f} K (bicubic: {by['Bicubic']['q99_bias']:+.3f} and {by['Bicubic']['q1_bias']:+.3f}"
               f" K); interannual variability ratio {indep['interannual_variability_ratio']:.3f}.")
    return out


def markdown(results: dict) -> str:
    out = ["# Climate-change signal and year-to-year persistence: HadCM3 E1 and A1B", "",
           f"Command: `{results['command']}`; model: `dpdm finetune` on E1 1860-1950 (`{results['finetune_command']}`).",
           "", "36 x 48 points (1.25 x 1.875 deg) over North America, input = 4 x 4 block means; 1961-1990 and "
           "2070-2099, never seen in fine-tuning. Ensembles: "
           f"{results['members']} members, DPM-Solver++ {results['steps']} steps. Member-wise scores are the mean over "
           "members ± their spread. Lag-1 autocorrelation (AC) and interannual variability: of detrended annual "
           "anomalies within each 30-year period (mean of the two); the residual's AC is of the field minus the "
           "regression stage's mean (the part the noise draws).", ""]
    for scenario, rows in results["scenarios"].items():
        r0 = rows[0]
        out += [f"## {scenario}: truth's change signal {r0['truth_signal']:.2f} K (domain mean), truth's lag-1 AC "
                f"{r0['truth_lag1']:.3f}, truth's residual lag-1 AC {r0['truth_residual_lag1']:.3f}", "",
                "| method | " + " | ".join(c for _, c, _ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        for r in rows:
            cells = []
            for key, _, fmt in COLUMNS:
                if key not in r:
                    cells.append("–")
                    continue
                spread = r.get(key + "_spread", 0.0)
                if not np.isfinite(r[key]):  # e.g. the regression stage's residual from itself
                    cells.append("–")
                    continue
                cells.append(f"{r[key]:{fmt}}" + (f" ± {spread:.2g}" if spread else ""))
            out.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        out += ["", *findings(rows), ""]
    if results.get("training_residual_lag1") is not None:
        out += [f"`auto` noise correlation: the truth's fine-scale residual (truth - regression mean) has lag-1 "
                f"autocorrelation {results['training_residual_lag1']:.3f} over the fine-tuning years (E1 1860-1950).",
                ""]
    out += [f"Sampling wall time (s, shared 2-core CPU): {json.dumps({k: round(v) for k, v in results['timings'].items()})}"]
    if results.get("notes"):
        out += [""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "runs" / "climate" / "hadcm3-1860-1950"))
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--correlations", default="0,auto", help="noise_time_correlation values of the ensembles; auto: "
                    "the lag-1 autocorrelation of the truth's fine-scale residual over the fine-tuning years")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the recorded .json")
    args = ap.parse_args()
    if args.markdown_only:
        path = Path(args.out_dir) / "climate_signal.json"
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.evaluation import set_scheduler

    pipe = DownscalingPipeline.from_pretrained(args.model)
    set_scheduler(pipe, "dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    correlations, measured = [], None
    for c in args.correlations.split(","):
        if c == "auto":
            measured = training_residual_persistence(pipe)
            correlations.append(round(min(max(measured, 0.0), 0.95), 2))
        else:
            correlations.append(float(c))
    results = {"training_residual_lag1": measured, "command": "python benchmarks/climate_signal.py " + " ".join(
        a if not os.path.exists(a) else os.path.relpath(a, ROOT) for a in sys.argv[1:]),
        "finetune_command": "dpdm finetune E1_north_america.nc -o runs/climate/hadcm3-1860-1950 --variable "
                            "air_temperature=surface_temperature --train-time 1860,1950 --validation-time 1951,1960 "
                            "--steps 600 --regression-steps 600 --learning-rate 0.0002",
        "members": args.members, "steps": args.steps, "correlations": correlations, "scenarios": {}, "timings": {}}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for scenario in ("E1", "A1B"):
        truth = load_scenario(scenario)
        fcs = forecasts(pipe, truth, args.members, args.steps, correlations, results["timings"], scenario)
        results["scenarios"][scenario] = score_scenario(truth[VAR], fcs)
        if scenario == "A1B":
            maps_figure(truth[VAR], fcs, out_dir / "climate_signal_maps.png", args.members, correlations[-1])
        (out_dir / "climate_signal.json").write_text(json.dumps(results, indent=1, default=float))
        (out_dir / "climate_signal.md").write_text(markdown(results))
        print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
