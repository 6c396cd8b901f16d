"""Region benchmark: fine-tune the shipped model on a new region with `dpdm finetune`, test on a warmer climate.

    python benchmarks/regions.py --steps 600 --regression-steps 600          # fine-tunes, then scores
    python benchmarks/regions.py --skip-training --run-dir runs/regions-hadcm3  # scores an existing run

Data (iris-sample-data, real HadCM3 1.5 m air temperature, 1.25 x 1.875 deg, yearly): the E1 scenario's
North America file trimmed to 36 x 48 points (a 9 x 12 cell region at 4x), input = 4 x 4 block means.
Fine-tuning: E1 1860-2000, validation (scores, spread calibration) E1 2001-2020. Test: A1B 2050-2099,
a warmer scenario the fine-tuning never sees, on the whole crop and the Gulf Coast box (20-35N, 100-80W).
The fine-tuning runs exactly what the README's "bring your own region" recipe runs (`dpdm finetune`).

Writes benchmarks/results/regions.md and regions.json (paths relative to the repository).
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


def scores(ens: xr.DataArray, truth: xr.DataArray) -> dict:
    """RMSE of the mean, of one member, CRPS (fair; MAE for one field), spread-skill and bias, whole crop and Gulf box."""
    from dpdm_diffusers import metrics

    out = {}
    for region, box in (("crop", None), ("gulf", GULF)):
        e, t = metrics.select_region(ens, box), metrics.select_region(truth, box)
        mean = e.mean("member") if "member" in e.dims else e
        one = e.isel(member=0) if "member" in e.dims else e
        out[region] = {
            "rmse_mean": float(metrics.rmse(mean, t)), "rmse_member": float(metrics.rmse(one, t)),
            "crps": float(metrics.crps(e, t)), "ssr": float(metrics.spread_skill_ratio(e, t)),
            "bias": float(metrics.bias(mean, t)),
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "dpdm-glosea4-ts-x4"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "regions-hadcm3"))
    ap.add_argument("--steps", type=int, default=600, help="diffusion-stage steps")
    ap.add_argument("--regression-steps", type=int, default=600)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--sampler-steps", type=int, default=10)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "regions"))
    args = ap.parse_args()

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.cli import finetune_argv
    from dpdm_diffusers.data import coarsen, open_dataset, regrid, trim_to_multiple
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.static_fields import get_static_fields

    torch.set_num_threads(os.cpu_count() or 1)
    e1, a1b = sample_file("E1_north_america.nc"), sample_file("A1B_north_america.nc")
    run = Path(args.run_dir)
    argv = finetune_argv([e1], model=args.model, output_dir=str(run), variable=["air_temperature=surface_temperature"],
                         train_time="1860,2000", validation_time="2001,2020", steps=args.steps,
                         regression_steps=args.regression_steps, learning_rate=args.learning_rate)
    train_s = None
    if not args.skip_training:
        from dpdm_diffusers.training.train_dpdm import main as train_main

        t0 = time.perf_counter()
        train_main(argv)
        train_s = time.perf_counter() - t0

    # test data: A1B 2050-2099 on the same 36 x 48 crop, block-mean input
    truth = trim_to_multiple(open_dataset(a1b, variables=["air_temperature"], time=("2050", "2099")), 4).load()
    low = coarsen(truth, 4)
    grid = Grid.from_xarray(truth)
    static = get_static_fields(grid, ["topography", "land_sea_mask"])
    static = {k: static[k] for k in static.data_vars}
    t = truth["air_temperature"]
    rows = {}
    rows["Lerp (bilinear)"] = scores(regrid(low, grid, "bilinear")["air_temperature"], t)
    rows["Bicubic"] = scores(regrid(low, grid, "bicubic")["air_temperature"], t)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = dict(static_fields=static, num_inference_steps=args.sampler_steps, variable_map={"air_temperature": "surface_temperature"})
    timings = {}

    def ensemble(pipe, name, members):
        pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        out = pipe(low, num_members=members, generator=gen(), **kw)
        timings[name] = time.perf_counter() - t0
        return out.members["air_temperature"]

    base = DownscalingPipeline.from_pretrained(args.model)
    rows["No retraining: shipped regression stage"] = scores(ensemble(base.regression_pipeline(), "base_reg", 1).isel(member=0), t)
    rows[f"No retraining: shipped two-stage, {args.members}-member mean"] = scores(ensemble(base, "base", args.members), t)
    tuned = DownscalingPipeline.from_pretrained(run)
    stage1 = DownscalingPipeline.from_pretrained(run / "stage1-regression")
    rows["Fine-tuned regression (stage 1)"] = scores(ensemble(stage1, "stage1", 1).isel(member=0), t)
    rows[f"Fine-tuned two-stage, {args.members}-member mean"] = scores(ensemble(tuned, "tuned", args.members), t)
    summary = json.loads((run / "training_summary.json").read_text())
    s1 = json.loads((run / "stage1-regression" / "training_summary.json").read_text())

    command = "python benchmarks/regions.py " + " ".join(sys.argv[1:])
    rel = lambda p: os.path.relpath(p, ROOT) if str(p).startswith(str(ROOT)) else os.path.basename(str(p))  # noqa: E731
    result = {
        "command": command, "finetune_command": "dpdm finetune " + " ".join(rel(a) if os.path.exists(a) else a for a in argv),
        "fine_tuning_wall_s": train_s or summary.get("wall_time_s", 0) + s1.get("wall_time_s", 0),
        "stage_wall_s": {"regression": s1.get("wall_time_s"), "diffusion": summary.get("wall_time_s")},
        "spread_calibration": summary.get("spread_calibration"), "stochastic_std": summary.get("stochastic_std"),
        "members": args.members, "sampler_steps": args.sampler_steps, "inference_s": timings, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Region fine-tuning: HadCM3 North America (Gulf Coast), E1 -> A1B",
        "",
        f"Command: `{command}` (this machine: 2 CPU cores). Fine-tuning ran `{result['finetune_command']}` "
        f"in {result['fine_tuning_wall_s'] / 60:.1f} min (stage 1 {(s1.get('wall_time_s') or 0) / 60:.1f} min, stage 2 with "
        f"calibration {(summary.get('wall_time_s') or 0) / 60:.1f} min).",
        "",
        "Data: `iris-sample-data` HadCM3 1.5 m air temperature (yearly, 1.25 x 1.875 deg), 36 x 48 points, input = 4x4 block "
        "means (9 x 12 cells). Fine-tuned on E1 1860-2000, validated and spread-calibrated on E1 2001-2020; tested on "
        f"A1B 2050-2099 (50 fields, a warmer scenario never seen). {args.members} members, DPM-Solver++ {args.sampler_steps} steps. "
        "K; CRPS is the fair CRPS (MAE for deterministic rows); spread-skill 1 = calibrated.",
        "",
    ]
    for region, title in (("crop", "Whole crop (36 x 48)"), ("gulf", "Gulf Coast box, 20-35N 100-80W")):
        lines += [f"## {title}", "", "| method | RMSE of the mean | RMSE of one member | CRPS | spread-skill | bias |",
                  "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            x = r[region]
            ssr = "–" if not np.isfinite(x["ssr"]) else f"{x['ssr']:.2f}"
            lines.append(f"| {name} | {x['rmse_mean']:.3f} | {x['rmse_member']:.3f} | {x['crps']:.3f} | {ssr} | {x['bias']:+.3f} |")
        lines.append("")
    cal = summary.get("spread_calibration") or {}
    if cal:
        lines += [f"Spread calibration on the validation years: factor {cal['factor']:.3f}, CRPS {cal['crps_uncalibrated']:.4f} -> "
                  f"{cal['crps']:.4f}, spread-skill {cal['ssr_uncalibrated']:.2f} -> {cal['ssr']:.2f}.", ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
