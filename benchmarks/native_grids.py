"""Rotated-pole and Lambert-conformal regions, end to end: zero-shot with the shipped model, a short `dpdm finetune`,
scored against Lerp and bicubic on data the fine-tuning never trained on, with maps drawn in the native projection.

    python benchmarks/native_grids.py --case uk --steps 300 --regression-steps 300        # about 10 CPU-minutes
    python benchmarks/native_grids.py --case lambert --steps 300 --regression-steps 300   # about 8 CPU-minutes
    python benchmarks/native_grids.py --case uk --skip-training                            # re-score an existing run

(uk) Met Office UM 1.5 km over the Irish Sea, Wales and north-west England, rotated pole (iris-sample-data
`uk_hires.pp`, written as netCDF by `python -m dpdm_diffusers.uk_hires`): potential temperature, 3 hourly times x 7
model levels, 204 x 184 cells (trimmed from 187 columns to a multiple of 4), input = 4 x 4 block means (6 km). Only
3 consecutive hours exist, so no time can be held out that is not the same weather: the test is a held-out box (North
Wales and Cheshire, 52.6-53.5N 4.2-2.5W, 64 x 76 fine cells) that the loss never sees (`--validation-lat-box`); its
spread calibration (one factor) is fitted on that box too. The shipped model was trained at 140 km: the zero-shot rows
show what a 90x change of scale does; the static fields are the file's own 1.5 km orography (`--static
topography=orography.nc`) and the packaged 5-arcmin land fraction averaged over each cell's footprint.

(lambert) HadCM3 1.5 m air temperature (iris-sample-data, 1.25 x 1.875 deg, yearly) put on a Lambert conformal grid
over North America (standard parallels 33N/45N, central meridian 97W, origin 40N; 100 km cells, 28 x 40) with
`data.regrid_to_native` (bilinear), standing for a regional model's output: E1 1860-2000 fine-tunes, E1 2001-2020
validates and calibrates, and the test is the warmer A1B scenario 2050-2099. The test input is what a user has: the
A1B lat/lon field put on the coarse (400 km) Lambert grid by `dpdm regrid --method conservative`. The fine "truth"
carries HadCM3's own detail (1.25 deg), not a regional model's: the scores measure the recovery of that detail.

Writes benchmarks/results/native_grids_<case>.json, native_grids.md and native_grids_<case>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from regions import ensemble, portable, rel, sample_file, scores  # noqa: E402  (the region benchmarks' scoring)

UK_BOX = {"lat": (52.6, 53.5), "lon": (-4.2, -2.5)}
LAMBERT = {"grid_mapping_name": "lambert_conformal_conic", "standard_parallel": [33.0, 45.0],
           "longitude_of_central_meridian": -97.0, "latitude_of_projection_origin": 40.0}
EVERYWHERE = (-180.0, 180.0, -90.0, 90.0)  # metrics.Box: the whole (already cropped) domain


def lambert_grid():
    from dpdm_diffusers.native_grids import native_grid

    return native_grid(LAMBERT, (np.arange(28) - 13.5) * 100e3, (np.arange(40) - 19.5) * 100e3, "lambert_conformal")


def finetune(args, files, run, **options):
    from dpdm_diffusers.training import train_dpdm
    from dpdm_diffusers.training.config import to_argv
    from dpdm_diffusers.training.finetune import base_objective, finetune_config

    if args.recompute_statistics:
        options["recompute_statistics"] = True
    cfg = finetune_config(files, model=args.model, output_dir=str(run), steps=args.steps,
                          regression_steps=args.regression_steps, learning_rate=args.learning_rate,
                          objective=base_objective(args.model), **options)
    wall = None
    if not args.skip_training:
        t0 = time.perf_counter()
        train_dpdm.run(cfg)
        wall = time.perf_counter() - t0
    # paths inside option values (the --static_files mapping) relative to the repository too
    return portable(to_argv(cfg)).replace(f"{ROOT}/", ""), wall


def rows_for(args, low, truth_var, var, static, static_packaged, run, timings, variable_map):
    """Lerp, bicubic, the shipped model zero-shot, and the fine-tuned stages, scored on the whole (cropped) domain."""
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.data import regrid
    from dpdm_diffusers.grids import Grid

    grid = Grid.from_xarray(truth_var)
    t = truth_var
    kw = dict(num_inference_steps=args.sampler_steps, variable_map=variable_map)
    rows = {"Lerp (bilinear)": scores(regrid(low, grid, "bilinear")[var], t, EVERYWHERE),
            "Bicubic": scores(regrid(low, grid, "bicubic")[var], t, EVERYWHERE)}
    base = DownscalingPipeline.from_pretrained(args.model)
    rows["Zero-shot: shipped regression stage"] = scores(
        ensemble(base.regression_pipeline(), low, 1, timings, "base_reg", static_fields=static, **kw)[var].isel(member=0), t, EVERYWHERE)
    own = ""
    if static_packaged is not None:
        rows[f"Zero-shot: shipped two-stage, {args.members}-member mean (packaged topography)"] = scores(
            ensemble(base, low, args.members, timings, "base_packaged", static_fields=static_packaged, **kw)[var], t, EVERYWHERE)
        own = " (the file's own orography)"
    rows[f"Zero-shot: shipped two-stage, {args.members}-member mean{own}"] = scores(
        ensemble(base, low, args.members, timings, "base", static_fields=static, **kw)[var], t, EVERYWHERE)
    stage1 = DownscalingPipeline.from_pretrained(run / "stage1-regression")
    tuned = DownscalingPipeline.from_pretrained(run)
    rows["Fine-tuned regression (stage 1)"] = scores(
        ensemble(stage1, low, 1, timings, "stage1", static_fields=static, **kw)[var].isel(member=0), t, EVERYWHERE)
    members = ensemble(tuned, low, args.members, timings, "tuned", static_fields=static, **kw)
    rows[f"Fine-tuned two-stage, {args.members}-member mean"] = scores(members[var], t, EVERYWHERE)
    return rows, members, regrid(low, grid, "bicubic")


def run_uk(args) -> dict:
    from dpdm_diffusers.data import coarsen, standardize, trim_to_multiple
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.static_fields import get_static_fields
    from dpdm_diffusers.uk_hires import save_uk_hires
    from dpdm_diffusers.user_data import box_indices

    run_dir = Path(args.run_dir)
    files = save_uk_hires(run_dir / "uk-data")
    run = run_dir / ("uk-rotated" + args.suffix)
    argv, wall = finetune(args, [str(files["theta"])], run, variable=["air_potential_temperature=surface_temperature"],
                          static=[f"topography={files['orography']}"],
                          validation_lat_box=",".join(map(str, UK_BOX["lat"])),
                          validation_lon_box=",".join(map(str, UK_BOX["lon"])))
    var = "air_potential_temperature"
    truth = trim_to_multiple(standardize(xr.open_dataset(files["theta"]))[[var]], 4).load()
    ys, xs = box_indices(Grid.from_xarray(truth), 4, UK_BOX["lat"], UK_BOX["lon"])  # the held-out box
    truth = truth.isel(y=ys, x=xs)
    low = coarsen(truth, 4)
    grid = Grid.from_xarray(truth)
    static = get_static_fields(grid, ["topography", "land_sea_mask"], sources={"topography": str(files["orography"])})
    packaged = get_static_fields(grid, ["topography", "land_sea_mask"])
    timings = {}
    rows, members, bicubic = rows_for(args, low, truth[var], var, static, packaged, run, timings,
                                      {var: "surface_temperature"})
    lat, lon = grid.geographic()
    figure(args, "uk" + args.suffix, truth[var].isel(time=0, model_level_number=0), bicubic[var].isel(time=0, model_level_number=0),
           members[var].isel(time=0, model_level_number=0), static["land_sea_mask"], grid, "theta, model level 1 (K)")
    return _result(args, run, argv, wall, timings, rows,
                   "theta.nc --variable air_potential_temperature=surface_temperature --static topography=orography.nc "
                   "--validation-lat-box 52.6,53.5 --validation-lon-box -4.2,-2.5",
                   domain=(f"held-out box {UK_BOX}: {grid.shape[0]} x {grid.shape[1]} fine cells (1.5 km), lat "
                           f"{lat.min():.2f}..{lat.max():.2f}, lon {lon.min():.2f}..{lon.max():.2f}; 3 times x 7 levels = 21 fields"))


def run_lambert(args) -> dict:
    from dpdm_diffusers.data import open_dataset, regrid_to_native, standardize
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.native_grids import output_coords
    from dpdm_diffusers.static_fields import get_static_fields
    from dpdm_diffusers.workflows import regrid_file

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    grid = lambert_grid()
    var = "air_temperature"

    def on_lambert(path, time_range, out):
        if not out.exists():
            ds = regrid_to_native(open_dataset(path, variables=[var], time=time_range), grid, "bilinear")
            ds = ds.assign_coords(output_coords(grid, "y", "x"))
            ds.drop_vars([c for c in ("forecast_period", "forecast_reference_time") if c in ds.coords]).to_netcdf(out)
        return out

    e1 = on_lambert(sample_file("E1_north_america.nc"), ("1860", "2020"), run_dir / "na-lambert-e1.nc")
    a1b = on_lambert(sample_file("A1B_north_america.nc"), ("2050", "2099"), run_dir / "na-lambert-a1b.nc")
    coarse = run_dir / "na-lambert-a1b-coarse.nc"
    if not coarse.exists():  # the README's step: the GCM's lat/lon field onto the coarse (400 km) Lambert grid
        regrid_file(sample_file("A1B_north_america.nc"), coarse, e1, scale_factor=4, method="conservative",
                    variables=[var], time=("2050", "2099"))
    run = run_dir / ("na-lambert" + args.suffix)
    argv, wall = finetune(args, [str(e1)], run, variable=["air_temperature=surface_temperature"],
                          train_time="1860,2000", validation_time="2001,2020")
    truth = standardize(xr.open_dataset(a1b)).load()
    low = standardize(xr.open_dataset(coarse)).sel(time=slice("2050", "2099")).load()
    static = get_static_fields(Grid.from_xarray(truth), ["topography", "land_sea_mask"])
    timings = {}
    rows, members, bicubic = rows_for(args, low, truth[var], var, static, None, run, timings,
                                      {var: "surface_temperature"})
    figure(args, "lambert" + args.suffix, truth[var].isel(time=-1), bicubic[var].isel(time=-1), members[var].isel(time=-1),
           static["land_sea_mask"], Grid.from_xarray(truth), "1.5 m air temperature, 2099 (K)")
    lat, lon = grid.geographic()
    return _result(args, run, argv, wall, timings, rows,
                   "na-lambert-e1.nc --variable air_temperature=surface_temperature --train-time 1860,2000 "
                   "--validation-time 2001,2020",
                   domain=(f"Lambert conformal {LAMBERT}, 100 km cells, {grid.shape[0]} x {grid.shape[1]}, lat "
                           f"{lat.min():.1f}..{lat.max():.1f}, lon {lon.min():.1f}..{lon.max():.1f}; A1B 2050-2099 (50 fields)"),
                   regrid_command="dpdm regrid A1B_north_america.nc -o na-lambert-a1b-coarse.nc --like na-lambert-e1.nc "
                                  "--scale-factor 4 --method conservative --variables air_temperature --time 2050,2099")


def _result(args, run: Path, argv: str, wall, timings: dict, rows: dict, finetune_args: str, **extra) -> dict:
    """What a case records: the commands that made it, the fine-tuning's summary, timings and the scored rows."""
    return {
        "command": "python benchmarks/native_grids.py " + " ".join(sys.argv[1:]),
        "finetune_command": (f"dpdm finetune {finetune_args} -o {rel(run)} --steps {args.steps} --regression-steps "
                             f"{args.regression_steps} --learning-rate {args.learning_rate:g}"
                             + (" --recompute-statistics" if args.recompute_statistics else "")),
        "train_argv": argv, "fine_tuning_wall_s": wall, "training_summary": _summary(run),
        "members": args.members, "sampler_steps": args.sampler_steps, "inference_s": timings, "rows": rows, **extra,
    }


def _summary(run: Path) -> dict:
    s2 = json.loads((run / "training_summary.json").read_text())
    s1 = json.loads((run / "stage1-regression" / "training_summary.json").read_text())
    keep = ("val_rmse_mean", "val_rmse_lerp", "spread_calibration", "stochastic_std", "wall_time_s")
    return {"stage1": {k: s1.get(k) for k in keep}, "stage2": {k: s2.get(k) for k in keep}}


def figure(args, case, truth, bicubic, members, land, grid, label):
    """Truth, bicubic, the fine-tuned mean and one member, drawn in the grid's own projection (its x/y axes), with the
    graticule from pyproj and the coastline as the 0.5 land-fraction contour (no map download needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, lon = grid.geographic()
    scale = 1.0 if grid.mapping.rotated else 1e-3
    x, y = grid.x * scale, grid.y * scale
    panels = [("truth", truth), ("bicubic", bicubic), (f"fine-tuned, {members.sizes['member']}-member mean",
                                                       members.mean("member")), ("fine-tuned, one member", members.isel(member=0))]
    lo, hi = np.nanpercentile(truth.values, [1, 99])
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4), constrained_layout=True)
    for ax, (title, field) in zip(axes, panels):
        im = ax.pcolormesh(x, y, np.asarray(field.transpose(*field.dims[-2:]).values), vmin=lo, vmax=hi, cmap="RdYlBu_r",
                           shading="nearest")
        ax.contour(x, y, land.values, [0.5], colors="k", linewidths=0.8)
        ax.contour(x, y, lat, np.arange(-90, 91, 1 if grid.mapping.rotated else 5), colors="0.5", linewidths=0.4)
        ax.contour(x, y, lon, np.arange(-180, 181, 1 if grid.mapping.rotated else 10), colors="0.5", linewidths=0.4)
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlabel("rotated longitude (deg)" if grid.mapping.rotated else "x (km)")
    axes[0].set_ylabel("rotated latitude (deg)" if grid.mapping.rotated else "y (km)")
    fig.colorbar(im, ax=axes, shrink=0.8, label=label)
    fig.suptitle(f"{grid.describe()}: grey lines every {'1 deg' if grid.mapping.rotated else '5 deg lat / 10 deg lon'}, "
                 "black: coastline (land fraction 0.5)", fontsize=10)
    out = Path(args.out).with_name(f"native_grids_{case}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_markdown(out_dir: Path) -> None:
    lines = ["# Rotated-pole and Lambert-conformal regions", "",
             "From `python benchmarks/native_grids.py --case uk|lambert` on a 2-core CPU (module docstring: data, splits "
             "and what the few time steps allow). CRPS is the fair CRPS (MAE for a deterministic row); spread-skill 1 = "
             "calibrated; the 1st/99th percentile biases and the Wasserstein distance are of every value pooled "
             "(ensembles member by member). Area weights: cos(rotated latitude) on the rotated grid, equal on the "
             "Lambert grid.", ""]
    titles = {"uk": "(a) UK 1.5 km, rotated pole: potential temperature (K), held-out box",
              "uk-restats": "(a') the same, fine-tuned with the statistics re-estimated on the region",
              "lambert": "(b) North America, Lambert conformal 100 km: HadCM3 1.5 m air temperature (K), A1B 2050-2099",
              "lambert-restats": "(b') the same, fine-tuned with the statistics re-estimated on the region"}
    for case in titles:
        path = out_dir / f"native_grids_{case}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        lines += [f"## {titles[case]}", "", f"Command: `{res['command']}`; fine-tuning: `{res['finetune_command']}`"
                  + (f"; test input: `{res['regrid_command']}`" if "regrid_command" in res else "") + ".", "",
                  f"Domain: {res['domain']}. {res['members']} members, DPM-Solver++ {res['sampler_steps']} steps. "
                  f"Fine-tuning wall time {res['fine_tuning_wall_s'] or 0:.0f} s.", "",
                  "| method | RMSE of the mean | RMSE of one member | CRPS | spread-skill | bias | 1st pct bias | 99th pct bias | Wasserstein |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in res["rows"].items():
            s = r["box"]
            ssr = f"{s['ssr']:.2f}" if np.isfinite(s["ssr"]) and "member" in name else "–"
            lines.append(f"| {name} | {s['rmse_mean']:.3f} | {s['rmse_member']:.3f} | {s['crps']:.3f} | {ssr} | "
                         f"{s['bias']:+.3f} | {s['q1_bias']:+.3f} | {s['q99_bias']:+.3f} | {s['wasserstein']:.3f} |")
        cal = (res["training_summary"]["stage2"] or {}).get("spread_calibration")
        if cal:
            lines += ["", f"Spread calibration on the validation split: factor {cal['factor']:.3f}, CRPS "
                      f"{cal['crps_uncalibrated']:.4f} -> {cal['crps']:.4f}, spread-skill {cal['ssr_uncalibrated']:.2f} -> "
                      f"{cal['ssr']:.2f}. Validation RMSE of the mean (stage 2) {res['training_summary']['stage2']['val_rmse_mean']:.3f}, "
                      f"Lerp {res['training_summary']['stage2']['val_rmse_lerp']:.3f}."]
        lines += ["", f"![maps](native_grids_{case}.png)", ""]
    (out_dir / "native_grids.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("uk", "lambert"), required=True)
    ap.add_argument("--model", default=str(ROOT / "models" / "dpdm-glosea4-ts-x4"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "native-grids"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--regression-steps", type=int, default=300)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--sampler-steps", type=int, default=10)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--recompute-statistics", action="store_true",
                    help="fine-tune with the normalisation statistics re-estimated on the region (case suffix -restats)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "native_grids"))
    args = ap.parse_args()
    args.suffix = "-restats" if args.recompute_statistics else ""
    res = run_uk(args) if args.case == "uk" else run_lambert(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(f"native_grids_{args.case}{args.suffix}.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    write_markdown(out.parent)
    print((out.parent / "native_grids.md").read_text())


if __name__ == "__main__":
    main()
