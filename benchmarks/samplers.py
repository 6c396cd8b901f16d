"""Sampler quality vs cost on real data, raw and with the spread calibrated for each step count.

    python benchmarks/samplers.py --model models/dpdm-glosea4-ts-x4 [--fields 4 --members 8]

Uses a 64 x 64 px window (one tile: 80 deg lat x 120 deg lon, 40S-40N, 60-180E) of the glosea4-ts-x4
month, so the full-length DDPM (all 960 steps of the saved schedule) stays affordable on a CPU.

1. Raw: every sampler with the model's saved spread (calibrated for 10 DPM-Solver++ steps) on the test month;
   the same initial noise per member (same seed). Full-length DDPM is the reference.
2. Calibrated (two-stage models): fewer steps narrow the spread, so for each sampler and step count the spread
   factor is calibrated on the window of 2011-12, the benchmark's validation month (spread-skill 1,
   :func:`calibrate_spread`), then the
   test month's window is scored: RMSE of the ensemble mean, fair CRPS, spread-skill, against 20 calibrated
   DPM-Solver++ steps. UNet calls per member = diffusion-UNet tile evaluations / (members x tiles); the
   regression UNet runs once per field, shared by all members.

Writes ``benchmarks/results/samplers.md``/``.json`` (paths relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SAMPLERS = [("ddpm", 960), ("ddim", 25), ("dpmsolver++", 20), ("dpmsolver++", 10), ("dpmsolver++", 5),
            ("unipc", 10), ("ddim", 10)]
CALIBRATED = [("dpmsolver++", 20), ("dpmsolver++", 10), ("dpmsolver++", 4), ("unipc", 4), ("ddim", 4),
              ("dpmsolver++", 3), ("dpmsolver++", 2)]
BOX = {"lat": (-40, 40), "lon": (60, 180)}


def window(bench, split: str, fields: int):
    """(low, truth, static) of the 64 x 64 px window of one month, its first ``fields`` realizations."""
    from dpdm_diffusers.data import select_box
    from dpdm_diffusers.glosea4 import VARIABLE
    from dpdm_diffusers.grids import Grid

    truth, low = bench.split(split)
    low = select_box(low, **BOX).isel(realization=slice(0, fields))
    grid = Grid.from_xarray(low).refine(4)
    truth = truth.isel(realization=slice(0, fields))
    # the window's own points, labelled with the output grid's coordinates so that xarray aligns them exactly
    truth = truth.sel(lat=grid.lat, lon=grid.lon, method="nearest")[VARIABLE]
    assert np.allclose(truth["lat"], grid.lat) and np.allclose(truth["lon"] % 360, np.asarray(grid.lon) % 360)
    truth = truth.assign_coords(lat=grid.lat, lon=grid.lon)
    static = bench.static.sel(lat=grid.lat, lon=grid.lon, method="nearest").assign_coords(lat=grid.lat, lon=grid.lon)
    return low, truth, static[["topography", "land_sea_mask"]]


class CallCounter:
    """Counts the diffusion UNet's sample evaluations (tiles x members) while installed."""

    def __init__(self, unet):
        self.unet, self.original, self.n = unet, unet.forward, 0

    def __enter__(self):
        def forward(sample, timestep, *a, **k):
            self.n += sample.shape[0]
            return self.original(sample, timestep, *a, **k)

        self.unet.forward = forward
        return self

    def __exit__(self, *exc):
        self.unet.forward = self.original


def score(members, truth) -> dict:
    from dpdm_diffusers import metrics

    if members.sizes["lat"] != truth.sizes["lat"] or not np.allclose(members["lat"], truth["lat"]):
        raise ValueError("members and truth are on different grids")
    members = members.assign_coords(lat=truth["lat"], lon=truth["lon"])
    mean = members.mean("member")
    return {
        "rmse_mean": float(np.sqrt(((mean - truth) ** 2).mean())),
        "rmse_member": float(np.sqrt(((members.isel(member=0) - truth) ** 2).mean())),
        "spread": float(np.sqrt(members.var("member", ddof=1).mean())),
        "crps": float(metrics.crps(members, truth, members_dim="member")),
        "ssr": float(metrics.spread_skill_ratio(members, truth, members_dim="member")),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "dpdm-glosea4-ts-x4"))
    ap.add_argument("--fields", type=int, default=4, help="realizations of each month")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--skip-ddpm", action="store_true", help="leave out the full-length reference")
    ap.add_argument("--from-json", action="store_true", help="only re-render samplers.md from samplers.json")
    args = ap.parse_args()
    if args.from_json:
        return write_markdown(json.loads((RESULTS / "samplers.json").read_text()))

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.calibration import calibrate_spread
    from dpdm_diffusers.data import regrid
    from dpdm_diffusers.evaluation import set_scheduler
    from dpdm_diffusers.glosea4 import VARIABLE, load_glosea4_benchmark
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.io import portable_command

    bench = load_glosea4_benchmark()
    low, truth, static = window(bench, "test", args.fields)
    lerp = regrid(low, Grid.from_xarray(low).refine(4))[VARIABLE]
    lerp_rmse = float(np.sqrt(((lerp.transpose(*truth.dims) - truth) ** 2).mean()))
    pipe = DownscalingPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    saved_std = list(pipe.config.stochastic_std)
    run = dict(static_fields=static, num_members=args.members, tiles_per_call=64)

    rows = []
    for name, steps in [s for s in SAMPLERS if not (args.skip_ddpm and s[0] == "ddpm")]:
        set_scheduler(pipe, name)
        t0 = time.perf_counter()
        with CallCounter(pipe.unet) as calls:
            out = pipe(low, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **run)
        rows.append({"sampler": name, "steps": steps, "unet_tile_evaluations": calls.n,
                     "wall_s": time.perf_counter() - t0, **score(out.members[VARIABLE], truth)})
        print(rows[-1], flush=True)
    ref = next((r for r in rows if r["sampler"] == "ddpm"), None)
    for r in rows:
        r["rmse_vs_ddpm"] = r["rmse_mean"] / ref["rmse_mean"] if ref else None

    calibrated = []
    if pipe.regression_unet is not None:
        v_low, v_truth, v_static = window(bench, "validation", args.fields)
        n_tiles = None
        for name, steps in CALIBRATED:
            set_scheduler(pipe, name)
            pipe.register_to_config(stochastic_std=saved_std)
            cal = calibrate_spread(pipe, v_low, v_truth, static_fields=v_static, num_members=args.members,
                                   num_inference_steps=steps, seed=1, tiles_per_call=64)
            pipe.register_to_config(stochastic_std=cal["stochastic_std"])
            with CallCounter(pipe.unet) as calls:
                out = pipe(low, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **run)
            if n_tiles is None:  # 20 steps first: tiles per member and field follow from its count
                n_tiles = calls.n // (steps * args.members * args.fields)
            calibrated.append({"sampler": name, "steps": steps, "factor": cal["factor"],
                               "validation_ssr": cal["ssr"], "validation_crps": cal["crps"],
                               "unet_calls_per_member": calls.n / (args.members * args.fields * n_tiles),
                               **score(out.members[VARIABLE], truth)})
            print(calibrated[-1], flush=True)
        pipe.register_to_config(stochastic_std=saved_std)
        base = calibrated[0]
        for r in calibrated:
            r["rmse_vs_20"], r["crps_vs_20"] = r["rmse_mean"] / base["rmse_mean"], r["crps"] / base["crps"]

    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    data = {"machine": machine, "command": portable_command(["python", *sys.argv]), "lerp_rmse": lerp_rmse,
            "fields": args.fields, "members": args.members, "rows": rows, "calibrated": calibrated}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "samplers.json").write_text(json.dumps(data, indent=2))
    write_markdown(data)


def write_markdown(data: dict) -> None:
    """benchmarks/results/samplers.md from the results (``--from-json`` re-renders a recorded run)."""
    rows, calibrated, ref = data["rows"], data["calibrated"], next((r for r in data["rows"] if r["sampler"] == "ddpm"), None)
    lines = [
        "# Samplers: quality vs cost (glosea4-ts-x4, 64 x 64 px window 40S-40N, 60-180E)", "",
        f"Machine: {data['machine']}. Command: `{data['command']}`. {data['fields']} fields x {data['members']} members "
        f"of the test month 2012-01; Lerp RMSE {data['lerp_rmse']:.3f} K.", "",
        "## Raw: the saved spread (set for 10 DPM-Solver++ steps)", "",
        "| sampler | steps | UNet tile evaluations | wall (s) | RMSE mean (K) | vs full DDPM | RMSE 1 member (K) | spread (K) | CRPS (K) | SSR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = f"{r['rmse_vs_ddpm']:.3f}" if r["rmse_vs_ddpm"] else "–"
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['unet_tile_evaluations']} | {r['wall_s']:.1f} | {r['rmse_mean']:.3f} | "
                     f"{vs} | {r['rmse_member']:.3f} | {r['spread']:.3f} | {r['crps']:.3f} | {r['ssr']:.2f} |")
    if ref:
        lines += ["", f"Full-length DDPM runs every one of the saved schedule's {ref['steps']} steps (t = 959 .. 0); "
                  "fewer steps of any sampler give a narrower spread."]
    if calibrated:
        lines += [
            "", "## Spread calibrated for each step count (month 2011-12, same window), scored on the test month", "",
            "Each sampler's spread factor (on the saved `stochastic_std`) brings the spread-skill to 1 on 2011-12, the "
            "benchmark's validation month; the default model is a refit that trained on it, so the factors are "
            "compared with each other (the same calibration for every step count), not read as held-out "
            "calibrations. The test month is only scored.",
            "", "| sampler | steps | UNet calls per member | spread factor | SSR on 2011-12 | RMSE mean (K) | vs 20 steps | "
                "CRPS (K) | vs 20 steps | SSR |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in calibrated:
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['unet_calls_per_member']:.0f} | {r['factor']:.3f} | "
                         f"{r['validation_ssr']:.2f} | {r['rmse_mean']:.3f} | {r['rmse_vs_20']:.3f} | {r['crps']:.3f} | "
                         f"{r['crps_vs_20']:.3f} | {r['ssr']:.2f} |")
        ok = [r for r in calibrated if r["unet_calls_per_member"] <= 4 and r["rmse_vs_20"] <= 1.03 and r["crps_vs_20"] <= 1.03]
        best = min(ok, key=lambda r: (r["unet_calls_per_member"], r["crps"])) if ok else None
        lines += ["", (f"Fewest UNet calls within 3% of calibrated 20-step DPM-Solver++ in both RMSE and CRPS: "
                       f"{best['sampler']} {best['steps']} steps ({best['unet_calls_per_member']:.0f} calls per member; "
                       f"RMSE {best['rmse_vs_20']:.3f}x, CRPS {best['crps_vs_20']:.3f}x), with its spread factor "
                       f"{best['factor']:.3f} (`dpdm calibrate --steps {best['steps']}`).") if best else
                  "No sampler with at most 4 UNet calls per member is within 3% of calibrated 20-step DPM-Solver++."]
    (RESULTS / "samplers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
