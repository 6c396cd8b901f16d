"""The ``dpdm`` command line (typer): downscale files, evaluate models, run the demo.

    dpdm downscale coarse.nc --model models/dpdm-glosea4-ts-x4 --members 10 --output fine.nc
    dpdm evaluate --model models/dpdm-glosea4-ts-x4 --members 1,10,33 --baselines lerp,bicubic
    dpdm calibrate --model models/dpdm-glosea4-ts-x4 --write
    dpdm demo
"""

from __future__ import annotations

import json
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
    input: Path = typer.Argument(..., exists=True, help="Low-res netCDF file or zarr store (any record length)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .zarr (streamed, default choice for long records) or .nc."),
    model: str = typer.Option(str(DEFAULT_MODEL), help="Pipeline folder or Hub id."),
    members: int = typer.Option(10, min=1, help="Ensemble size."),
    steps: int = typer.Option(10, min=1, help="Denoising steps."),
    scheduler: str = typer.Option("dpmsolver++", help="ddpm | ddim | dpmsolver++ | unipc | euler"),
    seed: int = typer.Option(0, help="Seed of the ensemble (a time step's members depend only on it and the time stamp)."),
    chunk_size: int = typer.Option(12, min=1, help="Time steps per chunk: written as soon as done, the unit of resume."),
    write_members: bool = typer.Option(True, "--write-members/--no-write-members", help="Write every member (<var>)."),
    stats: bool = typer.Option(True, "--stats/--no-stats", help="Write the ensemble mean and spread (<var>_mean, <var>_std)."),
    tiles_per_call: Optional[int] = typer.Option(None, "--tiles-per-call", "--batch-size", min=1,
                                                 help="Tiles per UNet call, a speed/memory knob (default: 16 on CPU, 256 on a GPU); --batch-size is its old name."),
    conserve: bool = typer.Option(False, "--conserve/--no-conserve",
                                  help="Make every member coarsen back to the input exactly (inputs that are block means of the target)."),
    static: Optional[Path] = typer.Option(None, exists=True, help="Static fields file, any regular grid (default: packaged)."),
    variable: list[str] = typer.Option([], "--variable", help="Your variable name = the model's, e.g. air_temperature=surface_temperature."),
    static_map: list[str] = typer.Option([], "--static-map", help="Variable name in the --static file = channel, e.g. orog=topography."),
    device: str = typer.Option("auto", help="auto (this process's accelerator, else cpu), cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("fp32", help="UNet arithmetic: fp32 | bf16 | fp16 (GPU); autocast, float32 weights."),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last", help="NHWC convolutions (free speed)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the UNets (opt-in; a minute of compiling first)."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (torch.set_num_threads)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, warnings and errors only."),
    overwrite: bool = typer.Option(False, help="Replace an existing output (only once the new one is complete)."),
):
    """Downscale a low-res record into an ensemble on the model's finer grid, streamed chunk by chunk to disk.

    Safe to kill and rerun: the same command resumes from the first unfinished chunk. Under
    `accelerate launch` or `torchrun` the chunks are split between processes (one GPU each).
    """
    import logging
    import warnings

    import xarray as xr

    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.data import mapping_hint, parse_mapping, standardize
    from dpdm_diffusers.evaluation import set_scheduler
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.reconstruct import process_state, reconstruct
    from dpdm_diffusers.speed import apply_fast_paths

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        dlogging.disable_progress_bar()
        warnings.simplefilter("ignore", UserWarning)
    if output.exists() and not overwrite:
        raise typer.BadParameter(f"{output} exists; pass --overwrite to replace it.", param_hint="--output")
    try:
        mapping = parse_mapping(variable)
        state = process_state()
        dev = state.device if device == "auto" else device
        pipe = set_scheduler(DownscalingPipeline.from_pretrained(model), scheduler)
        apply_fast_paths(pipe, device=dev, dtype=dtype, channels_last=channels_last, compile=compile, threads=threads)
        ds = standardize(xr.open_dataset(input, engine="zarr" if input.suffix == ".zarr" else None, chunks={}))
        wanted = [k for k, v in mapping.items() if v in pipe.config.variables]
        names = [v for v in pipe.config.variables if v not in mapping.values()] + wanted
        missing = [v for v in names if v not in ds.data_vars]
        if missing:
            hint = mapping_hint(missing, [str(v) for v in ds.data_vars if v not in names])
            raise ValueError(f"{input} lacks the model's variables {missing}; it holds {sorted(map(str, ds.data_vars))}.{hint}")
        ds = ds[names]
        static_fields = None
        if static is not None:
            from dpdm_diffusers.static_fields import get_static_fields

            grid = Grid.from_xarray(ds).refine(pipe.config.scale_factor)
            channels = list(pipe.config.static_channels)
            sf = get_static_fields(grid, channels, sources={c: xr.open_dataset(static) for c in channels},
                                   rename=parse_mapping(static_map))
            static_fields = {k: sf[k] for k in sf.data_vars}
        res = reconstruct(pipe, ds, output, num_members=members, num_inference_steps=steps, seed=seed, chunk_size=chunk_size,
                          static_fields=static_fields, variable_map=mapping, tiles_per_call=tiles_per_call, members=write_members,
                          stats=stats, overwrite=overwrite, progress=not quiet, model_id=model, conserve=conserve)
    except (KeyError, ValueError, FileExistsError, PermissionError) as err:  # bad input: the message, not a traceback
        raise typer.BadParameter(str(err).strip("'\"")) from None
    if state.is_main_process:
        typer.echo(f"wrote {res.path} ({res.chunks_total} chunks; this process: {res.time_steps_per_minute:.1f} time steps/min, "
                   f"{res.members_per_second:.2f} members/s)")


@app.command()
def evaluate(
    model: str = typer.Option(str(DEFAULT_MODEL), help="Pipeline folder or Hub id."),
    benchmark: str = typer.Option("glosea4-ts-x4", help="Benchmark name (glosea4-ts-x4)."),
    members: str = typer.Option("1,10", help="Ensemble sizes to score, e.g. 1,10,33."),
    baselines: str = typer.Option("lerp,bicubic,lerp_lapse,bicubic_lapse,regression",
                                  help="lerp, bicubic, lerp_lapse, bicubic_lapse (+ 6.5 K/km lapse rate), regression."),
    regression_model: str = typer.Option(str(DEFAULT_REGRESSION), help="Deterministic baseline (folder or Hub id)."),
    scheduler: str = typer.Option("dpmsolver++", help="Sampler."),
    steps: int = typer.Option(10, min=1, help="Denoising steps."),
    seed: int = typer.Option(0),
    max_fields: Optional[int] = typer.Option(None, help="Score only the first N test realizations (quick runs)."),
    out_dir: Path = typer.Option(Path("outputs/evaluation"), help="Folder for the markdown, JSON and PNG files."),
    conservation: bool = typer.Option(True, "--conservation/--no-conservation", help="Also score every row made to coarsen back to the input."),
):
    """Table 1 of the paper (RMSE/ACC/SSIM/PSNR) plus CRPS and spread-skill, per region, with figures."""
    from dpdm_diffusers.evaluation import evaluate_glosea4, write_report

    if benchmark != "glosea4-ts-x4":
        raise typer.BadParameter(f"unknown benchmark {benchmark!r}; available: glosea4-ts-x4")
    base = [b.strip() for b in baselines.split(",") if b.strip()]
    from dpdm_diffusers.evaluation import BASELINES

    allowed = {*BASELINES, "regression"}
    unknown = sorted(set(base) - allowed)
    if unknown:
        raise typer.BadParameter(f"unknown baselines {unknown}; use {', '.join(sorted(allowed))}")
    # a regression baseline that is neither a local folder nor a Hub id (owner/name) is skipped
    looks_like_hub_id = regression_model.count("/") == 1 and not regression_model.startswith((".", "/"))
    reg = regression_model if "regression" in base and (Path(regression_model).exists() or looks_like_hub_id) else None
    result = evaluate_glosea4(model, members=_ints(members), baselines=[b for b in base if b != "regression"],
                              regression_model=reg, scheduler=scheduler, num_inference_steps=steps, seed=seed,
                              max_fields=max_fields, conservation=conservation)
    figs = write_report(result, out_dir, command="dpdm " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    typer.echo(result.markdown)
    typer.echo(f"\nwrote {out_dir}/quality_glosea4.md, .json and figures: {', '.join(figs.values())}")


@app.command()
def calibrate(
    high_res: list[str] = typer.Argument(None, help="Your high-res validation files (default: the glosea4-ts-x4 validation month)."),
    model: str = typer.Option(str(DEFAULT_MODEL), help="Two-stage pipeline folder."),
    benchmark: str = typer.Option("glosea4-ts-x4", help="Benchmark whose validation split is used when no files are given."),
    validation_time: Optional[str] = typer.Option(None, help="With files: the validation period start,end (default: all)."),
    variable: list[str] = typer.Option([], "--variable", help="Your variable name = the model's, e.g. air_temperature=surface_temperature."),
    lat_box: Optional[str] = typer.Option(None, help="With files: region south,north."),
    lon_box: Optional[str] = typer.Option(None, help="With files: region west,east."),
    low_res: list[str] = typer.Option([], "--low-res", help="With files: a real low-res source (default: block means)."),
    max_samples: int = typer.Option(16, min=1, help="Validation fields used."),
    members: int = typer.Option(8, min=2, help="Ensemble size of the calibration run."),
    steps: int = typer.Option(10, min=1, help="Denoising steps (calibrate for the step count you sample with)."),
    target: str = typer.Option("ssr", help="ssr: spread-skill 1 on the validation data (robust to a warmer test climate); "
                               "crps: lowest fair CRPS (narrower)."),
    seed: int = typer.Option(0),
    write: bool = typer.Option(False, help="Store the calibrated stochastic_std in the folder's model_index.json."),
):
    """Scale a two-stage model's spread on validation data (yours, or the benchmark's): spread-skill 1, or lowest CRPS."""
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.calibration import calibrate_spread, write_stochastic_std

    pipe = DownscalingPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if high_res:
        from dpdm_diffusers.user_data import load_region, validation_inputs

        try:
            import warnings

            with warnings.catch_warnings():  # "no validation split" is not news here: all of the files is the split
                warnings.simplefilter("ignore", UserWarning)
                region = load_region(
                    high_res, scale_factor=pipe.config.scale_factor, low_res=low_res or None,
                    variables=list(pipe.config.variables), variable_map=variable,
                    units=dict(zip(pipe.config.variables, pipe.config.units)),
                    lat_box=_pair(lat_box, "--lat-box"), lon_box=_pair(lon_box, "--lon-box"),
                    static_channels=list(pipe.config.static_channels), validation_time=_pair(validation_time, "--validation-time"),
                )
            if region.validation is None:
                region.validation = {}  # every field of the files
            low, truth, static = validation_inputs(region, max_samples)
        except (KeyError, ValueError) as err:
            raise typer.BadParameter(str(err).strip("'\"")) from None
        res = calibrate_spread(pipe, low, truth, static_fields=static, num_members=members, num_inference_steps=steps,
                               seed=seed, target=target)
    else:
        from dpdm_diffusers.glosea4 import load_glosea4_benchmark

        if benchmark != "glosea4-ts-x4":
            raise typer.BadParameter(f"unknown benchmark {benchmark!r}; available: glosea4-ts-x4 (or pass your files)")
        bench = load_glosea4_benchmark()
        truth, low = bench.split("validation")
        res = calibrate_spread(pipe, low.rename(member="realization"), truth.rename(member="realization"),
                               static_fields={k: bench.static[k] for k in bench.static.data_vars},
                               num_members=members, num_inference_steps=steps, seed=seed, target=target)
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "curve"}, indent=2))
    if write:
        try:
            index = write_stochastic_std(model, res["stochastic_std"])
        except FileNotFoundError:
            raise typer.BadParameter(f"{model} is not a local pipeline folder; --write needs one.") from None
        typer.echo(f"wrote stochastic_std={res['stochastic_std']} to {index}")


def _pair(text: Optional[str], what: str) -> list[str]:
    if not text:
        return []
    parts = [x.strip() for x in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise typer.BadParameter(f"{what} is written as two comma-separated values (e.g. 1860,2000), got {text!r}")
    return parts


def finetune_argv(
    high_res: list[str], *, model: str, output_dir: str, variable: list[str] = (), static_map: list[str] = (),
    static: list[str] = (), low_res: list[str] = (), train_time: str | None = None, validation_time: str | None = None,
    lat_box: str | None = None, lon_box: str | None = None, validation_lat_box: str | None = None,
    validation_lon_box: str | None = None, steps: int = 500, regression_steps: int | None = None, batch_size: int = 16,
    learning_rate: float = 1e-4, seed: int = 0, regular_grid: bool = False, config: str | None = None,
    resume: bool = False, extra: list[str] = (),
) -> list[str]:
    """The training-script arguments that ``dpdm finetune`` runs (also what the README recipe shows)."""
    from dpdm_diffusers.data import parse_mapping

    argv = ["--config", config] if config else []
    argv += ["--init_from", model, "--output_dir", output_dir, "--high_res", ",".join(high_res),
             "--max_train_steps", str(steps), "--train_batch_size", str(batch_size), "--learning_rate", str(learning_rate),
             "--seed", str(seed), "--report_to", "none"]
    if regression_steps is not None:
        argv += ["--regression_steps", str(regression_steps)]
    for flag, value in (("--variable_map", variable), ("--static_map", static_map)):
        mapping = parse_mapping(list(value))
        if mapping:
            argv += [flag, json.dumps(mapping)]
    if static:
        argv += ["--static_files", json.dumps({k: v for k, v in parse_mapping(list(static)).items()})]
    if low_res:
        argv += ["--low_res", ",".join(low_res)]
    for flag, value, what in (("--train_time", train_time, "--train-time"), ("--validation_time", validation_time, "--validation-time"),
                              ("--lat_box", lat_box, "--lat-box"), ("--lon_box", lon_box, "--lon-box"),
                              ("--validation_lat_box", validation_lat_box, "--validation-lat-box"),
                              ("--validation_lon_box", validation_lon_box, "--validation-lon-box")):
        if value:
            argv += [f"{flag}={','.join(_pair(value, what))}"]  # "=" form: a southern latitude starts with "-"
    if regular_grid:
        argv += ["--regular_grid", "true"]
    if resume:
        argv += ["--resume_from_checkpoint", "latest"]
    return argv + list(extra)


@app.command()
def finetune(
    high_res: list[str] = typer.Argument(..., help="Your high-res files: netCDF or zarr, globs allowed (quote them)."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Folder of the fine-tuned model (checkpoints too)."),
    model: str = typer.Option(str(DEFAULT_MODEL), help="Base model: pipeline folder or Hub id."),
    variable: list[str] = typer.Option([], "--variable", help="Your variable name = the model's, e.g. air_temperature=surface_temperature (repeatable)."),
    static: list[str] = typer.Option([], "--static", help="Your static field file per channel, e.g. topography=orog.nc (default: packaged global data)."),
    static_map: list[str] = typer.Option([], "--static-map", help="Variable name in a --static file = channel, e.g. orog=topography."),
    low_res: list[str] = typer.Option([], "--low-res", help="A real low-res source (default: block means of the high-res)."),
    train_time: Optional[str] = typer.Option(None, help="Training period start,end (inclusive), e.g. 1860,2000."),
    validation_time: Optional[str] = typer.Option(None, help="Validation period start,end: scores, spread calibration."),
    lat_box: Optional[str] = typer.Option(None, help="Region south,north (trimmed to whole coarse cells, logged)."),
    lon_box: Optional[str] = typer.Option(None, help="Region west,east (either longitude convention; may cross the dateline)."),
    validation_lat_box: Optional[str] = typer.Option(None, help="Spatial validation box south,north (for few time steps)."),
    validation_lon_box: Optional[str] = typer.Option(None, help="Spatial validation box west,east."),
    steps: int = typer.Option(500, min=1, help="Training steps (of each stage of a two-stage model)."),
    regression_steps: Optional[int] = typer.Option(None, min=1, help="Steps of the regression stage (default: --steps)."),
    batch_size: int = typer.Option(16, min=1, help="Patches per step."),
    learning_rate: float = typer.Option(1e-4, min=0.0, help="AdamW learning rate."),
    seed: int = typer.Option(0),
    regular_grid: bool = typer.Option(False, help="Put near-regular (e.g. Gaussian) latitudes on a regular grid, conservatively."),
    config: Optional[Path] = typer.Option(None, exists=True, help="YAML with any other training option (see train_dpdm --help)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --output-dir."),
):
    """Fine-tune a model on your region in one command: both stages of a two-stage model, then its spread.

    A two-stage model (the default) gets its regression stage fine-tuned, then its diffusion stage on the new
    regression, stochastic_std re-estimated and the spread calibrated on --validation-time (or the validation box).
    A regression (deterministic) model is fine-tuned as one; a plain diffusion model likewise.
    Same as `accelerate launch -m dpdm_diffusers.training.train_dpdm --init_from MODEL ...`, which scales to GPUs.
    """
    from dpdm_diffusers.training.train_dpdm import _load_config, model_kind
    from dpdm_diffusers.training.train_dpdm import main as train_main

    try:
        kind = model_kind(_load_config(model))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--model") from None
    argv = finetune_argv(high_res, model=model, output_dir=str(output_dir), variable=variable, static_map=static_map,
                         static=static, low_res=low_res, train_time=train_time, validation_time=validation_time,
                         lat_box=lat_box, lon_box=lon_box, validation_lat_box=validation_lat_box,
                         validation_lon_box=validation_lon_box, steps=steps, regression_steps=regression_steps,
                         batch_size=batch_size, learning_rate=learning_rate, seed=seed, regular_grid=regular_grid,
                         config=str(config) if config else None, resume=resume,
                         extra=["--objective", "regression"] if kind == "regression" else [])
    typer.echo("dpdm finetune runs: python -m dpdm_diffusers.training.train_dpdm " + " ".join(shlex.quote(a) for a in argv))
    try:
        out = train_main(argv)
    except (KeyError, ValueError) as err:  # data problems: a message, not a traceback
        raise typer.BadParameter(str(err).strip("'\"")) from None
    typer.echo(f"fine-tuned model in {out}")


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
