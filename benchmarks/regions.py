"""Region benchmarks: fine-tune on a new region with `dpdm finetune` and score where the model was never trained.

    python benchmarks/regions.py --case hadcm3 --steps 600 --regression-steps 600   # (a), about 10 CPU-minutes
    python benchmarks/regions.py --case naus                                         # (b), about 15 CPU-minutes
    python benchmarks/regions.py --case hadcm3 --skip-training                       # re-score an existing run
    python benchmarks/regions.py --case hadcm3 --calibration-target crps --run-suffix -crps   # the CRPS-calibrated row

(a) HadCM3 Gulf Coast:
real HadCM3 1.5 m air temperature (iris-sample-data, 1.25 x 1.875 deg, yearly): the E1 scenario's
North America file trimmed to 36 x 48 points (a 9 x 12 cell region at 4x), input = 4 x 4 block means.
Fine-tuning: E1 1860-2000, validation (scores, spread calibration) E1 2001-2020. Test: A1B 2050-2099,
a warmer scenario the fine-tuning never sees, on the whole crop and the Gulf Coast box (20-35N, 100-80W).
The fine-tuning runs exactly what the README's "bring your own region" recipe runs (`dpdm finetune`).

(b) Northern Australia on GloSea4 (glosea4-ts-x4): a regression model trained from scratch on the training months
with the box 20-10S 120-150E left out of its loss (`--validation_lat_box/--validation_lon_box`), then fine-tuned with
`dpdm finetune` on the box's own training months (an 8 x 16-point region, 2 x 4 coarse cells); scored on the box in
the test month (January 2012, 13 fields): Lerp, zero-shot (global input; box input) and fine-tuned.

Writes benchmarks/results/regions_<case>.json and regions.md (paths relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
GULF = (-100.0, -80.0, 20.0, 35.0)  # metrics.Box order: lon_min, lon_max, lat_min, lat_max


def sample_file(name: str) -> str:
    import iris_sample_data

    return os.path.join(os.path.dirname(iris_sample_data.__file__), "sample_data", name)


def scores(ens: xr.DataArray, truth: xr.DataArray, box=None) -> dict:
    """RMSE of the mean, of one member, CRPS (fair; MAE for one field), spread-skill and bias: whole crop and Gulf
    box, or only ``box`` when given."""
    from dpdm_diffusers import climate_scores, metrics

    out = {}
    for region, where in ((("crop", None), ("gulf", GULF)) if box is None else (("box", box),)):
        e, t = metrics.select_region(ens, where), metrics.select_region(truth, where)
        dims = [d for d in e.dims if d != "member"]
        e, t = e.transpose(*(["member"] if "member" in e.dims else []), *dims), t.transpose(*dims)
        mean = e.mean("member") if "member" in e.dims else e
        one = e.isel(member=0) if "member" in e.dims else e
        out[region] = {
            "rmse_mean": float(metrics.rmse(mean, t)), "rmse_member": float(metrics.rmse(one, t)),
            "crps": float(metrics.crps(e, t)), "ssr": float(metrics.spread_skill_ratio(e, t)),
            "bias": float(metrics.bias(mean, t)),
        }
        # the tails and the distribution, member by member (climate_scores.EXTREMES)
        table = climate_scores.score(t.to_dataset(name="value"), {"f": e.to_dataset(name="value")},
                                     ["q1_bias", "q99_bias", "wasserstein"])
        out[region].update({r.metric: r.value for r in table.itertuples()})
    return out


def rel(path) -> str:
    """A path as results files show it: relative to the repository, never a machine's absolute path."""
    from dpdm_diffusers.io import portable_path

    return portable_path(os.path.abspath(path))


def portable(argv) -> str:
    return " ".join(rel(a) if os.path.exists(a) else a for a in argv)


def ensemble(pipe, low, members, timings, name, **kw):
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    out = pipe(low, num_members=members, generator=torch.Generator().manual_seed(0), **kw)
    timings[name] = time.perf_counter() - t0
    return out.members


def run_hadcm3(args) -> dict:
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.data import coarsen, open_dataset, regrid, trim_to_multiple
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.static_fields import get_static_fields
    from dpdm_diffusers.training import train_dpdm
    from dpdm_diffusers.training.config import to_argv
    from dpdm_diffusers.training.finetune import base_objective, finetune_config

    e1, a1b = sample_file("E1_north_america.nc"), sample_file("A1B_north_america.nc")
    run = Path(args.run_dir) / ("hadcm3-gulf-coast" + args.run_suffix)
    # what `dpdm finetune` builds and runs
    cfg = finetune_config([e1], model=args.model, output_dir=str(run),
                          variable=["air_temperature=surface_temperature"], train_time="1860,2000",
                          validation_time="2001,2020", steps=args.steps, regression_steps=args.regression_steps,
                          learning_rate=args.learning_rate,
                          calibration_target=args.calibration_target, objective=base_objective(args.model))
    argv = to_argv(cfg)
    train_s = None
    if not args.skip_training:
        t0 = time.perf_counter()
        train_dpdm.run(cfg)
        train_s = time.perf_counter() - t0

    # test data: A1B 2050-2099 on the same 36 x 48 crop, block-mean input
    truth = trim_to_multiple(open_dataset(a1b, variables=["air_temperature"], time=("2050", "2099")), 4).load()
    low = coarsen(truth, 4)
    grid = Grid.from_xarray(truth)
    static = get_static_fields(grid, ["topography", "land_sea_mask"])
    kw = dict(static_fields=static, num_inference_steps=args.sampler_steps,
              variable_map={"air_temperature": "surface_temperature"})
    t, timings, rows, var = truth["air_temperature"], {}, {}, "air_temperature"
    rows["Lerp (bilinear)"] = scores(regrid(low, grid, "bilinear")[var], t)
    rows["Bicubic"] = scores(regrid(low, grid, "bicubic")[var], t)
    base = DownscalingPipeline.from_pretrained(args.model)
    rows["No retraining: shipped regression stage"] = scores(ensemble(base.regression_pipeline(), low, 1, timings, "base_reg", **kw)[var].isel(member=0), t)
    rows[f"No retraining: shipped two-stage, {args.members}-member mean"] = scores(ensemble(base, low, args.members, timings, "base", **kw)[var], t)
    tuned = DownscalingPipeline.from_pretrained(run)
    stage1 = DownscalingPipeline.from_pretrained(run / "stage1-regression")
    rows["Fine-tuned regression (stage 1)"] = scores(ensemble(stage1, low, 1, timings, "stage1", **kw)[var].isel(member=0), t)
    rows[f"Fine-tuned two-stage, {args.members}-member mean (spread: spread-skill 1 on validation, the default)"] = scores(
        ensemble(tuned, low, args.members, timings, "tuned", **kw)[var], t)
    crps_run = run.with_name(run.name + "-crps")  # the same fine-tuning with --calibration_target crps, when present
    if crps_run.exists():
        rows[f"Fine-tuned two-stage, {args.members}-member mean (spread: lowest validation CRPS)"] = scores(
            ensemble(DownscalingPipeline.from_pretrained(crps_run), low, args.members, timings, "tuned_crps", **kw)[var], t)
    summary = json.loads((run / "training_summary.json").read_text())
    s1 = json.loads((run / "stage1-regression" / "training_summary.json").read_text())
    cli = (f"dpdm finetune {os.path.basename(e1)} -o {rel(run)} --variable air_temperature=surface_temperature "
           f"--train-time 1860,2000 --validation-time 2001,2020 --steps {args.steps} --regression-steps {args.regression_steps} "
           f"--learning-rate {args.learning_rate:g}" + (" --config crps.yaml (calibration_target: crps)" if args.calibration_target == "crps" else ""))
    return {
        "command": "python benchmarks/regions.py " + " ".join(sys.argv[1:]), "finetune_command": cli,
        "train_argv": portable(argv),
        "fine_tuning_wall_s": train_s or (summary.get("wall_time_s", 0) + s1.get("wall_time_s", 0)),
        "stage_wall_s": {"regression": s1.get("wall_time_s"), "diffusion": summary.get("wall_time_s")},
        "spread_calibration": summary.get("spread_calibration"), "stochastic_std": summary.get("stochastic_std"),
        "validation": {k: v for k, v in summary.items() if k.startswith("val_")},
        "members": args.members, "sampler_steps": args.sampler_steps, "inference_s": timings, "rows": rows,
        "regions": {"crop": "whole crop (36 x 48)", "gulf": "Gulf Coast box, 20-35N 100-80W"},
    }


NAUS = {"lat": (-20.0, -10.0), "lon": (120.0, 150.0)}


def run_naus(args) -> dict:
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.data import coarsen, regrid, select_box, trim_to_multiple
    from dpdm_diffusers.glosea4 import load_glosea4_benchmark
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.training import train_dpdm
    from dpdm_diffusers.training.config import to_argv
    from dpdm_diffusers.training.finetune import finetune_config
    from dpdm_diffusers.training.train_dpdm import main as train_main

    run = Path(args.run_dir)
    scratch = run / "glosea4-without-naus"
    scratch_argv = ["--config", str(ROOT / "training" / "configs" / "glosea4_ts_x4.yaml"), "--objective", "regression",
                    "--validation_lat_box=-20,-10", "--validation_lon_box=120,150", "--max_train_steps", str(args.scratch_steps),
                    "--validation_steps", "500", "--output_dir", str(scratch), "--report_to", "none"]
    bench = load_glosea4_benchmark()
    data_file = run / "glosea4-high-res.nc"
    if not data_file.exists():
        run.mkdir(parents=True, exist_ok=True)
        bench.high_res.to_netcdf(data_file)
    tuned_dir = run / "naus-finetuned"
    # the scratch model is a regression model (it does not exist yet for dpdm finetune to read that off)
    cfg = finetune_config([str(data_file)], model=str(scratch), output_dir=str(tuned_dir), lat_box="-20,-10",
                          lon_box="120,150", train_time="2011-08,2011-11", validation_time="2011-12,2011-12",
                          steps=args.naus_steps, learning_rate=args.learning_rate, objective="regression")
    argv = to_argv(cfg)
    wall = {}
    if not args.skip_training:
        t0 = time.perf_counter()
        train_main(scratch_argv)
        wall["scratch_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_dpdm.run(cfg)
        wall["finetune_s"] = time.perf_counter() - t0

    var = "surface_temperature"
    truth_g, low_g = (x.sel(time="2012-01") for x in bench.split("test"))
    static_g = bench.static
    truth = trim_to_multiple(select_box(truth_g, **NAUS), 4)
    low = coarsen(truth, 4)
    grid = Grid.from_xarray(truth)
    static = select_box(static_g, **NAUS).isel(lat=slice(0, grid.shape[0]), lon=slice(0, grid.shape[1]))
    box = (120.0, 150.0, truth.lat.values.min(), truth.lat.values.max())
    t, timings, rows = truth[var], {}, {}
    rows["Lerp (bilinear)"] = scores(regrid(low, grid, "bilinear")[var], t, box)
    rows["Bicubic"] = scores(regrid(low, grid, "bicubic")[var], t, box)
    zero = DownscalingPipeline.from_pretrained(scratch)
    global_out = ensemble(zero, low_g[[var]], 1, timings, "zero_global", static_fields=static_g)[var].isel(member=0)
    rows["Zero-shot (box left out of training), global input"] = scores(global_out.sel(lat=truth.lat, lon=truth.lon), t, box)
    rows["Zero-shot (box left out of training), box input"] = scores(
        ensemble(zero, low, 1, timings, "zero_box", static_fields=static)[var].isel(member=0), t, box)
    tuned = DownscalingPipeline.from_pretrained(tuned_dir)
    rows["Fine-tuned on the box's training months, box input"] = scores(
        ensemble(tuned, low, 1, timings, "tuned_box", static_fields=static)[var].isel(member=0), t, box)
    shipped = DownscalingPipeline.from_pretrained(args.model).regression_pipeline()
    ref = ensemble(shipped, low_g[[var]], 1, timings, "shipped_global", static_fields=static_g)[var].isel(member=0)
    rows["Reference: shipped regression stage (box seen in training), global input"] = scores(ref.sel(lat=truth.lat, lon=truth.lon), t, box)
    return {
        "command": "python benchmarks/regions.py " + " ".join(sys.argv[1:]),
        "scratch_command": "python -m dpdm_diffusers.training.train_dpdm " + portable(scratch_argv),
        "finetune_command": (f"dpdm finetune {rel(data_file)} -o {rel(tuned_dir)} --model {rel(scratch)} --lat-box=-20,-10 "
                             f"--lon-box=120,150 --train-time 2011-08,2011-11 --validation-time 2011-12,2011-12 "
                             f"--steps {args.naus_steps} --learning-rate {args.learning_rate:g}"),
        "train_argv": portable(argv), "wall_s": wall, "inference_s": timings, "rows": rows,
        "regions": {"box": f"Northern Australia box, {truth.lat.values.min():.2f}..{truth.lat.values.max():.2f}N x "
                           f"{truth.lon.values.min():.2f}..{truth.lon.values.max():.2f}E ({grid.shape[0]} x {grid.shape[1]} points)"},
    }


def write_markdown(out: Path):
    lines = ["# Region fine-tuning benchmarks", "",
             "All figures in K, from `python benchmarks/regions.py` on a 2-core CPU. CRPS is the fair CRPS (MAE for a "
             "deterministic row); spread-skill 1 = calibrated; bias = mean of (forecast - truth). The 1st/99th percentile "
             "biases and the Wasserstein distance are of every value pooled, for an ensemble member by member "
             "(the members' mean; dpdm_diffusers.climate_scores).", ""]
    cases = {"hadcm3": "(a) HadCM3 Gulf Coast: fine-tuned on E1 1860-2000, tested on A1B 2050-2099",
             "naus": "(b) Northern Australia on GloSea4: box left out of training, then fine-tuned on it"}
    for case, title in cases.items():
        path = out.parent / f"regions_{case}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        lines += [f"## {title}", "", f"Command: `{r['command']}`."]
        if case == "hadcm3":
            cal = r.get("spread_calibration") or {}
            lines += [
                f"Fine-tuning ran `{r['finetune_command']}` in {r['fine_tuning_wall_s'] / 60:.1f} min "
                f"(stage 1 {(r['stage_wall_s']['regression'] or 0) / 60:.1f} min; stage 2 with re-estimated stochastic_std "
                f"and calibration {(r['stage_wall_s']['diffusion'] or 0) / 60:.1f} min; wall times on a shared 2-core machine, "
                "other jobs ran beside stage 2).",
                "",
                "HadCM3 1.5 m air temperature (iris-sample-data, yearly, 1.25 x 1.875 deg), 36 x 48 points, input = 4x4 block "
                "means (9 x 12 cells). Validation and spread calibration on E1 2001-2020; test on A1B 2050-2099 (50 fields, "
                f"a warmer scenario never seen). {r['members']} members, DPM-Solver++ {r['sampler_steps']} steps.",
            ]
            if cal:
                lines += ["", f"Spread calibration on the validation years: factor {cal['factor']:.3f}, CRPS "
                          f"{cal['crps_uncalibrated']:.4f} -> {cal['crps']:.4f}, spread-skill {cal['ssr_uncalibrated']:.2f} -> {cal['ssr']:.2f}."]
        else:
            w = r.get("wall_s", {})
            lines += [f"From scratch, with the box left out of the loss ({w.get('scratch_s', 0) / 60:.1f} min, other jobs "
                      f"shared the CPU): `{r['scratch_command']}`. Fine-tuned on the box ({w.get('finetune_s', 0) / 60:.1f} min): "
                      f"`{r['finetune_command']}` (a regression model, so `dpdm finetune` fine-tunes it with the regression "
                      "objective).", "",
                      "Test month January 2012 (13 fields), the box's own 8 x 16 points as input (2 x 4 coarse cells, padded "
                      "to one 64-px patch) unless marked global. Regression (deterministic) models: spread-skill does not "
                      "apply. The test month is austral summer, a season no training month shows: every learned model "
                      "of this experiment loses to interpolation here. (The reference row is the previous default's "
                      "regression stage; the current default, trained on December too, beats interpolation over the "
                      "box: model card.)"]
        lines.append("")
        for region, rtitle in r["regions"].items():
            lines += [f"### {rtitle}", "", "| method | RMSE of the mean | RMSE of one member | CRPS | spread-skill | bias | "
                      "1st pct bias | 99th pct bias | Wasserstein |", "|---|---|---|---|---|---|---|---|---|"]
            for name, row in r["rows"].items():
                x = row[region]
                ssr = "–" if not np.isfinite(x["ssr"]) else f"{x['ssr']:.2f}"
                tails = " | ".join(f"{x[k]:+.3f}" if k in x else "–" for k in ("q1_bias", "q99_bias"))
                w = f"{x['wasserstein']:.3f}" if "wasserstein" in x else "–"
                lines.append(f"| {name} | {x['rmse_mean']:.3f} | {x['rmse_member']:.3f} | {x['crps']:.3f} | {ssr} | "
                             f"{x['bias']:+.3f} | {tails} | {w} |")
            lines.append("")
        lines += [*r.get("notes", []), ""] if r.get("notes") else []
    out.with_suffix(".md").write_text("\n".join(lines))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("hadcm3", "naus"), default="hadcm3")
    ap.add_argument("--model", default=str(ROOT / "models" / "dpdm-glosea4-ts-x4"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "regions"))
    ap.add_argument("--steps", type=int, default=600, help="(a) diffusion-stage steps")
    ap.add_argument("--regression-steps", type=int, default=600, help="(a) regression-stage steps")
    ap.add_argument("--scratch-steps", type=int, default=1500, help="(b) steps of the model trained without the box")
    ap.add_argument("--naus-steps", type=int, default=300, help="(b) fine-tuning steps on the box")
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--sampler-steps", type=int, default=10)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--calibration-target", default="ssr", choices=("ssr", "crps"))
    ap.add_argument("--run-suffix", default="", help="(a) run folder suffix, e.g. -crps for the CRPS-calibrated run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "regions"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    result = run_hadcm3(args) if args.case == "hadcm3" else run_naus(args)
    if args.run_suffix:  # a side run: trained for its row in the main table, not a table of its own
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = out.parent / f"regions_{args.case}.json"
    if previous.exists():  # notes written by hand about a case (context of earlier runs) stay with it
        result.setdefault("notes", json.loads(previous.read_text()).get("notes", []))
    previous.write_text(json.dumps(result, indent=2))
    print(write_markdown(out))


if __name__ == "__main__":
    main()
