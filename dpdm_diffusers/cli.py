"""The ``dpdm`` command line (typer): downscale files, evaluate models, run the demo.

    dpdm downscale coarse.nc --model models/dpdm-glosea4-ts-x4 --members 10 --output fine.nc
    dpdm evaluate --model models/dpdm-glosea4-ts-x4 --members 1,10,33 --baselines lerp,bicubic
    dpdm calibrate --model models/dpdm-glosea4-ts-x4 --write
    dpdm demo
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Probabilistic downscaling with diffusion models (DPDM).")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "dpdm-glosea4-ts-x4"
DEFAULT_REGRESSION = REPO_ROOT / "models" / "regression-glosea4-ts-x4"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from err


@app.command()
def downscale(
    input: Path = typer.Argument(..., exists=True, help="Low-res netCDF file or zarr store."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .nc or .zarr (members, <var>_mean, <var>_std)."),
    model: str = typer.Option(str(DEFAULT_MODEL), help="Pipeline folder or Hub id."),
    members: int = typer.Option(10, min=1, help="Ensemble size."),
    steps: int = typer.Option(10, min=1, help="Denoising steps."),
    scheduler: str = typer.Option("dpmsolver++", help="ddpm | ddim | dpmsolver++ | unipc | euler"),
    seed: int = typer.Option(0, help="Seed of the ensemble."),
    batch_size: int = typer.Option(16, min=1, help="Tiles per UNet call (16 was fastest on CPU: benchmarks/results/speed.md)."),
    static: Optional[Path] = typer.Option(None, exists=True, help="Static fields on the target grid (default: packaged)."),
    device: str = typer.Option("cpu", help="torch device, e.g. cuda"),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
):
    """Downscale a low-res file into an ensemble on the model's finer grid."""
    import torch
    import xarray as xr

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.data import standardize
    from dpdm_diffusers.evaluation import set_scheduler
    from dpdm_diffusers.io import ensemble_dataset, write_dataset

    if output.exists() and not overwrite:
        raise typer.BadParameter(f"{output} exists; pass --overwrite to replace it.", param_hint="--output")
    pipe = set_scheduler(DownscalingPipeline.from_pretrained(model), scheduler).to(device)
    ds = standardize(xr.open_dataset(input, engine="zarr" if input.suffix == ".zarr" else None))
    ds = ds[list(pipe.config.variables)]
    static_fields = None
    if static is not None:
        sds = standardize(xr.open_dataset(static))
        static_fields = {k: sds[k] for k in pipe.config.static_channels}
    out = pipe(ds, static_fields=static_fields, num_members=members, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), batch_size=batch_size)
    path = write_dataset(ensemble_dataset(out.members, out.mean, out.std), output, overwrite=overwrite)
    typer.echo(f"wrote {path}")


@app.command()
def evaluate(
    model: str = typer.Option(str(DEFAULT_MODEL), help="Pipeline folder or Hub id."),
    benchmark: str = typer.Option("glosea4-ts-x4", help="Benchmark name (glosea4-ts-x4)."),
    members: str = typer.Option("1,10", help="Ensemble sizes to score, e.g. 1,10,33."),
    baselines: str = typer.Option("lerp,bicubic,regression", help="lerp, bicubic, regression."),
    regression_model: str = typer.Option(str(DEFAULT_REGRESSION), help="Deterministic baseline (folder or Hub id)."),
    scheduler: str = typer.Option("dpmsolver++", help="Sampler."),
    steps: int = typer.Option(10, min=1, help="Denoising steps."),
    seed: int = typer.Option(0),
    max_fields: Optional[int] = typer.Option(None, help="Score only the first N test realizations (quick runs)."),
    out_dir: Path = typer.Option(Path("outputs/evaluation"), help="Folder for the markdown, JSON and PNG files."),
):
    """Table 1 of the paper (RMSE/ACC/SSIM/PSNR) plus CRPS and spread-skill, per region, with figures."""
    from dpdm_diffusers.evaluation import evaluate_glosea4, write_report

    if benchmark != "glosea4-ts-x4":
        raise typer.BadParameter(f"unknown benchmark {benchmark!r}; available: glosea4-ts-x4")
    base = [b.strip() for b in baselines.split(",") if b.strip()]
    unknown = sorted(set(base) - {"lerp", "bicubic", "regression"})
    if unknown:
        raise typer.BadParameter(f"unknown baselines {unknown}; use lerp, bicubic, regression")
    # a regression baseline that is neither a local folder nor a Hub id (owner/name) is skipped
    looks_like_hub_id = regression_model.count("/") == 1 and not regression_model.startswith((".", "/"))
    reg = regression_model if "regression" in base and (Path(regression_model).exists() or looks_like_hub_id) else None
    result = evaluate_glosea4(model, members=_ints(members), baselines=base, regression_model=reg,
                              scheduler=scheduler, num_inference_steps=steps, seed=seed, max_fields=max_fields)
    figs = write_report(result, out_dir, command="dpdm " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    typer.echo(result.markdown)
    typer.echo(f"\nwrote {out_dir}/quality_glosea4.md, .json and figures: {', '.join(figs.values())}")


@app.command()
def calibrate(
    model: str = typer.Option(str(DEFAULT_MODEL), help="Two-stage pipeline folder."),
    benchmark: str = typer.Option("glosea4-ts-x4", help="Benchmark whose validation split is used (glosea4-ts-x4)."),
    members: int = typer.Option(8, min=2, help="Ensemble size of the calibration run."),
    steps: int = typer.Option(10, min=1, help="Denoising steps."),
    seed: int = typer.Option(0),
    write: bool = typer.Option(False, help="Store the calibrated stochastic_std in the folder's model_index.json."),
):
    """Scale a two-stage model's spread to the lowest fair CRPS on the benchmark's validation month."""
    import json
    import os

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.calibration import calibrate_spread
    from dpdm_diffusers.glosea4 import load_glosea4_benchmark

    if benchmark != "glosea4-ts-x4":
        raise typer.BadParameter(f"unknown benchmark {benchmark!r}; available: glosea4-ts-x4")
    pipe = DownscalingPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    bench = load_glosea4_benchmark()
    truth, low = bench.split("validation")
    res = calibrate_spread(pipe, low.rename(member="realization"), truth.rename(member="realization"),
                           static_fields={k: bench.static[k] for k in bench.static.data_vars},
                           num_members=members, num_inference_steps=steps, seed=seed)
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "curve"}, indent=2))
    if write:
        index = Path(model) / "model_index.json"
        if not index.exists():
            raise typer.BadParameter(f"{model} is not a local pipeline folder; --write needs one.")
        cfg = json.loads(index.read_text())
        cfg["stochastic_std"] = res["stochastic_std"]
        tmp = index.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, index)  # atomic: the folder is never left with a half-written config
        typer.echo(f"wrote stochastic_std={res['stochastic_std']} to {index}")


@app.command()
def demo(
    model: str = typer.Option(str(DEFAULT_MODEL), help="Pipeline folder (default: the shipped model)."),
    members: int = typer.Option(10, min=2, help="Ensemble size."),
    steps: int = typer.Option(10, min=1, help="Denoising steps of the fast sampler."),
    scheduler: str = typer.Option("dpmsolver++"),
    out_dir: Path = typer.Option(Path("outputs")),
    max_fields: Optional[int] = typer.Option(None, help="Only the first N of the 13 test fields."),
):
    """Downscale the held-out GloSea4 test month with the shipped model; print the table, write demo.nc/png."""
    from dpdm_diffusers import plots
    from dpdm_diffusers.evaluation import evaluate_glosea4
    from dpdm_diffusers.io import write_dataset

    t0 = time.perf_counter()
    if not Path(model).exists():
        raise typer.BadParameter(f"model folder {model} not found (the demo runs offline on a local folder)")
    reg = str(DEFAULT_REGRESSION) if DEFAULT_REGRESSION.exists() else None
    result = evaluate_glosea4(model, members=(1, members), baselines=("lerp",), regression_model=reg,
                              scheduler=scheduler, num_inference_steps=steps, max_fields=max_fields,
                              regions=("global", "east_asia", "gulf_coast", "northern_australia"))
    ens = result.members
    ds = ens.to_dataset(name="surface_temperature")
    ds["surface_temperature_mean"] = ens.mean("member").assign_attrs(ens.attrs, cell_methods="member: mean")
    ds["surface_temperature_std"] = ens.std("member", ddof=1).assign_attrs(units="K", cell_methods="member: standard_deviation")
    ds["truth"] = result.truth
    ds["lerp"] = result.lerp
    nc = write_dataset(ds, out_dir / "demo.nc", overwrite=True)
    one = dict(realization=0, time=0)
    png = plots.plot_maps(
        result.truth.isel(one), result.lerp.isel(one), ens.isel(member=0, **one), ens.isel(**one).mean("member"),
        ens.isel(**one).std("member", ddof=1), out_dir / "demo.png",
        title=f"GloSea4 surface temperature 2012-01: DPDM x4, {members} members", units="K",
        land_fraction=result.land_fraction,
    )
    typer.echo(result.markdown)
    typer.echo(f"\nwrote {nc} and {png}; demo took {time.perf_counter() - t0:.0f} s "
               f"(pipeline {result.timings['pipeline_s']:.0f} s for {result.config['fields']} fields x {members} members)")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
