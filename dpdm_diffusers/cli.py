"""The ``dpdm`` command line (typer): downscale files, evaluate, calibrate and fine-tune models, run the demo.

Each command parses its options, calls one library function (:mod:`dpdm_diffusers.workflows`,
:mod:`dpdm_diffusers.training.finetune`) and prints the result; bad input comes back as a message, not a traceback.

    dpdm downscale coarse.nc --model models/dpdm-glosea4-ts-x4 --members 10 --output fine.nc
    dpdm evaluate --model models/dpdm-glosea4-ts-x4 --members 1,10,33 --baselines lerp,bicubic
    dpdm calibrate --model models/dpdm-glosea4-ts-x4 --write
    dpdm demo
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import typer

from dpdm_diffusers.workflows import DEFAULT_MODEL, DEFAULT_REGRESSION

# `dpdm demo --quick` (`make demo`): 4 steps of DPM-Solver++ keep the shipped model's scores within noise of 10
# (benchmarks/results/samplers.md); 3 of the 13 test fields and 4 members make it about 10x cheaper
QUICK_DEMO = {"max_fields": 3, "members": 4, "steps": 4}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Probabilistic downscaling with diffusion models (DPDM).")


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (for bug reports); "
                               "without it an error is one line. Also DPDM_DEBUG=1."),
):
    """Probabilistic downscaling with diffusion models (DPDM)."""
    if debug:
        os.environ["DPDM_DEBUG"] = "1"


def _one_line(err: BaseException) -> str:
    """An exception as the one line ``dpdm`` prints: the message (the path of an OSError), never a traceback."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + (f": {err.filename}" if err.filename and str(err.filename) not in err.strerror else "")
    else:
        text = str(err).strip("'\"") or type(err).__name__
    if isinstance(err, (KeyError, AttributeError, TypeError, IndexError, ZeroDivisionError, AssertionError)):
        text = f"{type(err).__name__}: {text}"  # likely a bug rather than bad input: say what kind
    return " ".join(text.split())


def _items(text: str | None) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; nothing -> ``[]``."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else []


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from err


def _static_option(items: list[str]):
    """``--static`` of dpdm downscale: one path (every channel) or ``channel=path`` items; ``None`` for none."""
    from dpdm_diffusers.data import parse_mapping

    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        path = Path(items[0])
        if not path.exists():
            raise typer.BadParameter(f"{path} does not exist.", param_hint="--static")
        return path
    mapping = parse_mapping(items)
    missing = [p for p in mapping.values() if not Path(p).exists()]
    if missing:
        raise typer.BadParameter(f"{missing[0]} does not exist.", param_hint="--static")
    return mapping


@app.command()
def regrid(
    input: Path = typer.Argument(..., exists=True, help="Regular lat/lon netCDF file or zarr store (a GCM or reanalysis)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .nc or .zarr, on the target's coarse native grid."),
    like: Path = typer.Option(..., "--like", exists=True, help="A file on the rotated or projected target grid (CF grid_mapping), e.g. your high-res data."),
    scale_factor: int = typer.Option(1, min=1, help="How many times coarser than --like's grid the output is: the model's scale factor when --like is the fine grid."),
    method: str = typer.Option("bilinear", help="bilinear | conservative (cell footprint means; precipitation, finer sources)."),
    variables: str | None = typer.Option(None, help="Comma-separated variables to keep (default all)."),
    time: str | None = typer.Option(None, help="Inclusive time range to keep, e.g. 2050,2099."),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
):
    """Put a regular lat/lon field on the coarse native grid (rotated pole, Lambert, polar stereographic) of a
    regional target, so that `dpdm downscale` of the result lands on the target's grid."""
    from dpdm_diffusers.workflows import regrid_file

    try:
        path = regrid_file(input, output, like, scale_factor=scale_factor, method=method,
                           variables=_items(variables) or None, time=_pair(time, "--time") or None, overwrite=overwrite)
    except (KeyError, ValueError, FileExistsError, PermissionError) as err:
        raise typer.BadParameter(str(err).strip("'\"")) from None
    typer.echo(f"wrote {path}")


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
    tiles_per_call: int | None = typer.Option(None, "--tiles-per-call", "--batch-size", min=1,
                                                 help="Tiles per UNet call, a speed/memory knob (default: 16 on CPU, 256 on a GPU); --batch-size is its old name."),
    conserve: bool = typer.Option(False, "--conserve/--no-conserve",
                                  help="Make every member coarsen back to the input exactly (inputs that are block means of the target)."),
    static: list[str] = typer.Option([], "--static", help="Static fields: one file with every channel, or a file per "
                                     "channel, e.g. topography=orog.nc (others packaged); any regular lat/lon grid, or "
                                     "the output's own rotated/projected grid."),
    variable: list[str] = typer.Option([], "--variable", help="Your variable name = the model's, e.g. air_temperature=surface_temperature."),
    static_map: list[str] = typer.Option([], "--static-map", help="Variable name in the --static file = channel, e.g. orog=topography."),
    device: str = typer.Option("auto", help="auto (this process's accelerator, else cpu), cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("fp32", help="UNet arithmetic: fp32 | bf16 | fp16 (GPU); autocast, float32 weights."),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last", help="NHWC convolutions (free speed)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the UNets (opt-in; a minute of compiling first)."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads (torch.set_num_threads)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, warnings and errors only."),
    overwrite: bool = typer.Option(False, help="Replace an existing output (only once the new one is complete)."),
    noise_time_correlation: float | None = typer.Option(None, min=0.0, max=0.95, help="Lag-1 correlation in time "
                                                        "of each member's noise (0: independent steps; default: the "
                                                        "model's, measured in training; README: Judge it as climate scientists do)."),
):
    """Downscale a low-res record into an ensemble on the model's finer grid, streamed chunk by chunk to disk.

    Safe to kill and rerun: the same command resumes from the first unfinished chunk. Under
    `accelerate launch` or `torchrun` the chunks are split between processes (one GPU each).
    """
    import logging
    import warnings

    from dpdm_diffusers.data import parse_mapping
    from dpdm_diffusers.reconstruct import process_state
    from dpdm_diffusers.workflows import downscale_file

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        dlogging.disable_progress_bar()
        warnings.simplefilter("ignore", UserWarning)
    if output.exists() and not overwrite:
        raise typer.BadParameter(f"{output} exists; pass --overwrite to replace it.", param_hint="--output")
    try:
        res = downscale_file(
            input, output, model=model, num_members=members, num_inference_steps=steps, scheduler=scheduler, seed=seed,
            chunk_size=chunk_size, write_members=write_members, stats=stats, tiles_per_call=tiles_per_call,
            conserve=conserve, static=_static_option(static), variable_map=parse_mapping(variable),
            static_map=parse_mapping(static_map),
            device=device, dtype=dtype, channels_last=channels_last, compile=compile, threads=threads,
            overwrite=overwrite, progress=not quiet, noise_time_correlation=noise_time_correlation)
    except (KeyError, ValueError, FileExistsError, PermissionError) as err:  # bad input: the message, not a traceback
        raise typer.BadParameter(str(err).strip("'\"")) from None
    if process_state().is_main_process:
        typer.echo(f"wrote {res.path} ({res.chunks_total} chunks; this process: {res.time_steps_per_minute:.1f} time "
                   f"steps/min, {res.members_per_second:.2f} members/s)")


@app.command()
def evaluate(
    truth: list[str] = typer.Option([], "--truth", help="Your high-res files to score against (netCDF/zarr, globs "
                                    "allowed; repeatable). Without them: the --benchmark."),
    model: str = typer.Option(str(DEFAULT_MODEL), help="Pipeline folder or Hub id."),
    benchmark: str = typer.Option("glosea4-ts-x4", help="Benchmark name (glosea4-ts-x4), when no --truth is given."),
    members: str = typer.Option("1,10", help="Ensemble sizes to score, e.g. 1,10,33."),
    baselines: str | None = typer.Option(None, help="Benchmark: lerp, bicubic, lerp_lapse, bicubic_lapse, regression "
                                         "(default all); --truth: bilinear, bicubic, regression (default all)."),
    regression_model: str = typer.Option(str(DEFAULT_REGRESSION), help="Benchmark: deterministic baseline."),
    low_res: list[str] = typer.Option([], "--low-res", help="With --truth: a real low-res source (default: block "
                                      "means of the truth)."),
    variable: list[str] = typer.Option([], "--variable", help="With --truth: your name = the model's, e.g. t2m=2t."),
    unit: list[str] = typer.Option([], "--unit", help="With --truth: units of a variable whose file has none (or to "
                                   "convert to), e.g. tp=mm."),
    static: list[str] = typer.Option([], "--static", help="With --truth: static file per channel, e.g. "
                                     "topography=orog.nc (default: packaged global data)."),
    static_map: list[str] = typer.Option([], "--static-map", help="With --truth: name in a --static file = channel."),
    regular_grid: bool = typer.Option(False, help="With --truth: put Gaussian latitudes on a regular grid."),
    lat_box: str | None = typer.Option(None, help="With --truth: region south,north."),
    lon_box: str | None = typer.Option(None, help="With --truth: region west,east (your longitude convention)."),
    time: str | None = typer.Option(None, help="With --truth: period start,end."),
    wet_thresholds: str = typer.Option("0.1,1,10", help="With --truth: precipitation wet thresholds (its units)."),
    scheduler: str = typer.Option("dpmsolver++", help="Sampler."),
    steps: int = typer.Option(10, min=1, help="Denoising steps."),
    seed: int = typer.Option(0),
    max_fields: int | None = typer.Option(None, help="Benchmark: score only the first N test realizations."),
    out_dir: Path = typer.Option(Path("outputs/evaluation"), help="Folder for the markdown, JSON and PNG files."),
    conservation: bool = typer.Option(True, "--conservation/--no-conservation", help="Benchmark: also score every row made to coarsen back to the input."),
    forecast: list[str] = typer.Option([], "--forecast", help="With --truth: score these files (name=path, e.g. "
                                       "dpdm=out.nc from dpdm downscale; repeatable) instead of running --model."),
    reference: str | None = typer.Option(None, help="With --truth: reference period of the change signal, e.g. "
                                         "1961,1990."),
    future: str | None = typer.Option(None, help="With --truth: future period of the change signal, e.g. 2070,2099."),
    climate_metrics: str | None = typer.Option(None, "--metrics", help="With --truth: climate scores to run "
                                               "(dpdm_diffusers.climate_scores.REGISTRY names; default all)."),
    index_freq: str = typer.Option("YS", help="With --truth, daily data: period of the ETCCDI indices (YS, QS-DEC)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="With --forecast: spectra, quantile-quantile, "
                                 "rank-histogram and bias-map figures."),
):
    """Score a model, or forecast files, against your own high-res files (--truth), or a model on the benchmark.
    Per variable in its own units: the paper's Table 1 (RMSE/ACC/SSIM/PSNR), CRPS, spread-skill, rank histograms;
    tails, Wasserstein, RALSD, persistence, interannual variability, the change signal, twCRPS and Brier scores
    (each member against the truth, with the spread across members); ETCCDI indices of daily data (xclim);
    precipitation's wet fraction, percentiles, total and negatives; cross-variable consistency."""
    from dpdm_diffusers.data import parse_mapping

    command = "dpdm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    periods = None
    if reference or future:
        if not (reference and future):
            raise typer.BadParameter("The change signal needs both --reference and --future.")
        periods = (_pair(reference, "--reference"), _pair(future, "--future"))
    metric_names = _items(climate_metrics) if climate_metrics else None
    if truth and forecast:
        from dpdm_diffusers.file_evaluation import evaluate_forecast_files, write_figures, write_scores

        try:
            scores, t, fcs = evaluate_forecast_files(
                truth, forecast, low_res=low_res, variable_map=parse_mapping(variable),
                baselines=_items(baselines) if baselines else ("bilinear", "bicubic"),
                lat_box=_pair(lat_box, "--lat-box") or None, lon_box=_pair(lon_box, "--lon-box") or None,
                time=_pair(time, "--time") or None, periods=periods, climate_metrics=metric_names, index_freq=index_freq, seed=seed,
                wet_thresholds=[float(x) for x in _items(wet_thresholds)])
        except (KeyError, ValueError, FileNotFoundError) as err:
            raise typer.BadParameter(str(err).strip("'\"")) from None
        path = write_scores(scores, out_dir, "scores", command=command)
        typer.echo(scores.markdown())
        if figures:
            for fig in write_figures(t, fcs, out_dir):
                typer.echo(f"wrote {fig}")
        typer.echo(f"\nwrote {path} and {path.with_suffix('.json')}")
        return
    if forecast:
        raise typer.BadParameter("--forecast files are scored against --truth files: give both.")
    if truth:
        from dpdm_diffusers.file_evaluation import evaluate_files, write_scores

        try:
            scores = evaluate_files(
                model, truth, low_res=low_res, variable_map=parse_mapping(variable), units=parse_mapping(unit),
                static_files=parse_mapping(static), static_map=parse_mapping(static_map), regular_grid=regular_grid,
                lat_box=_pair(lat_box, "--lat-box"), lon_box=_pair(lon_box, "--lon-box"),
                time=_pair(time, "--time"), members=_ints(members), num_inference_steps=steps, seed=seed,
                scheduler=scheduler,
                wet_thresholds=[float(x) for x in _items(wet_thresholds)],
                baselines=_items(baselines) if baselines else ("bilinear", "bicubic", "regression"))
        except (KeyError, ValueError, FileNotFoundError) as err:
            raise typer.BadParameter(str(err).strip("'\"")) from None
        path = write_scores(scores, out_dir, "scores", command=command)
        typer.echo(scores.markdown())
        typer.echo(f"\nwrote {path} and {path.with_suffix('.json')}")
        return
    from dpdm_diffusers.evaluation import write_report
    from dpdm_diffusers.workflows import evaluate_benchmark

    try:
        result = evaluate_benchmark(
            model, benchmark=benchmark, members=_ints(members), regression_model=regression_model,
            baselines=_items(baselines or "lerp,bicubic,lerp_lapse,bicubic_lapse,regression"), scheduler=scheduler,
            num_inference_steps=steps, seed=seed, max_fields=max_fields, conservation=conservation)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    figs = write_report(result, out_dir, command=command)
    typer.echo(result.markdown)
    typer.echo(f"\nwrote {out_dir}/quality_glosea4.md, .json and figures: {', '.join(figs.values())}")


@app.command()
def calibrate(
    high_res: list[str] = typer.Argument(None, help="Your high-res validation files (default: the glosea4-ts-x4 validation month)."),
    model: str = typer.Option(str(DEFAULT_MODEL), help="Two-stage pipeline folder."),
    benchmark: str = typer.Option("glosea4-ts-x4", help="Benchmark whose validation split is used when no files are given."),
    validation_time: str | None = typer.Option(None, help="With files: the validation period start,end (default: all)."),
    variable: list[str] = typer.Option([], "--variable", help="Your variable name = the model's, e.g. air_temperature=surface_temperature."),
    lat_box: str | None = typer.Option(None, help="With files: region south,north."),
    lon_box: str | None = typer.Option(None, help="With files: region west,east."),
    low_res: list[str] = typer.Option([], "--low-res", help="With files: a real low-res source (default: block means)."),
    unit: list[str] = typer.Option([], "--unit", help="With files: units of a variable whose file has none (or to "
                                   "convert to), e.g. tp=mm."),
    static: list[str] = typer.Option([], "--static", help="With files: static file per channel, e.g. "
                                     "topography=orog.nc (default: packaged global data)."),
    static_map: list[str] = typer.Option([], "--static-map", help="With files: name in a --static file = channel."),
    regular_grid: bool = typer.Option(False, help="With files: put Gaussian latitudes on a regular grid."),
    max_samples: int = typer.Option(16, min=1, help="Validation fields used."),
    members: int = typer.Option(8, min=2, help="Ensemble size of the calibration run."),
    steps: int = typer.Option(10, min=1, help="Denoising steps (calibrate for the step count you sample with)."),
    scheduler: str | None = typer.Option(None, help="Sampler to calibrate for (ddpm | ddim | dpmsolver++ | unipc | "
                                         "euler; default: the model's saved one): the spread depends on it."),
    target: str = typer.Option("ssr", help="ssr: spread-skill 1 on the validation data (robust to a warmer test climate); "
                               "crps: lowest fair CRPS (narrower)."),
    seed: int = typer.Option(0),
    write: bool = typer.Option(False, help="Store the calibrated stochastic_std in the folder's model_index.json."),
):
    """Scale a two-stage model's spread on validation data (yours, or the benchmark's): spread-skill 1, or lowest CRPS."""
    from dpdm_diffusers.data import parse_mapping
    from dpdm_diffusers.workflows import calibrate_model

    try:
        res = calibrate_model(
            model, high_res or None, num_members=members, num_inference_steps=steps, target=target, seed=seed,
            scheduler=scheduler,
            write=write, benchmark=benchmark, validation_time=_pair(validation_time, "--validation-time"),
            variable_map=parse_mapping(variable), lat_box=_pair(lat_box, "--lat-box"),
            lon_box=_pair(lon_box, "--lon-box"), low_res=low_res, max_samples=max_samples, units=parse_mapping(unit),
            regular_grid=regular_grid, static_files=parse_mapping(static), static_map=parse_mapping(static_map))
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err).strip("'\"")) from None
    summary = {k: v for k, v in res.items() if k not in ("curve", "written", "per_variable")}
    summary["per_variable"] = {v: {k: x for k, x in r.items() if k != "curve"} for v, r in res["per_variable"].items()}
    typer.echo(json.dumps(summary, indent=2))
    if write:
        typer.echo(f"wrote stochastic_std={res['stochastic_std']} to {res['written']}")


def _pair(text: str | None, what: str) -> list[str]:
    if not text:
        return []
    parts = [x.strip() for x in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise typer.BadParameter(f"{what} is written as two comma-separated values (e.g. 1860,2000), got {text!r}")
    return parts


@app.command()
def finetune(
    high_res: list[str] = typer.Argument(..., help="Your high-res files: netCDF or zarr, globs allowed (quote them)."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o",
                                    help="Folder of the fine-tuned model (checkpoints too)."),
    model: str = typer.Option(str(DEFAULT_MODEL), help="Base model: pipeline folder or Hub id."),
    variable: list[str] = typer.Option([], "--variable", help="Your variable name = the model's, e.g. "
                                       "air_temperature=surface_temperature (repeatable)."),
    static: list[str] = typer.Option([], "--static", help="Your static field file per channel, e.g. "
                                     "topography=orog.nc (default: packaged global data)."),
    static_map: list[str] = typer.Option([], "--static-map",
                                         help="Variable name in a --static file = channel, e.g. orog=topography."),
    low_res: list[str] = typer.Option([], "--low-res",
                                      help="A real low-res source (default: block means of the high-res)."),
    unit: list[str] = typer.Option([], "--unit", help="Units of a variable whose file has none, e.g. tp=mm (data is "
                                   "converted to the model's units in any case)."),
    train_time: str | None = typer.Option(None, help="Training period start,end (inclusive), e.g. 1860,2000."),
    validation_time: str | None = typer.Option(None, help="Validation period start,end: scores, spread calibration."),
    lat_box: str | None = typer.Option(None, help="Region south,north (trimmed to whole coarse cells, logged)."),
    lon_box: str | None = typer.Option(None, help="Region west,east (either longitude convention; may cross the "
                                       "dateline)."),
    validation_lat_box: str | None = typer.Option(None,
                                                  help="Spatial validation box south,north (for few time steps)."),
    validation_lon_box: str | None = typer.Option(None, help="Spatial validation box west,east."),
    steps: int = typer.Option(500, min=1, help="Training steps (of each stage of a two-stage model)."),
    regression_steps: int | None = typer.Option(None, min=1,
                                                help="Steps of the regression stage (default: --steps)."),
    batch_size: int = typer.Option(16, min=1, help="Patches per step."),
    learning_rate: float = typer.Option(1e-4, min=0.0, help="AdamW learning rate."),
    seed: int = typer.Option(0),
    regular_grid: bool = typer.Option(False, help="Put near-regular (e.g. Gaussian) latitudes on a regular grid, "
                                      "conservatively."),
    config: Path | None = typer.Option(None, exists=True,
                                       help="YAML with any other training option (see train_dpdm --help)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --output-dir."),
    recompute_statistics: bool = typer.Option(False, "--recompute-statistics", help="Re-estimate the normalisation "
                                              "statistics on your data instead of keeping the base model's: for a "
                                              "region at another scale (a warning says when)."),
):
    """Fine-tune a model on your region in one command: both stages of a two-stage model, then its spread.

    A two-stage model (the default) gets its regression stage fine-tuned, then its diffusion stage on the new
    regression, stochastic_std re-estimated and the spread calibrated on --validation-time (or the validation box).
    A regression (deterministic) model is fine-tuned as one; a plain diffusion model likewise.
    Same as `accelerate launch -m dpdm_diffusers.training.train_dpdm --init_from MODEL ...`, which scales to GPUs.
    """
    from dpdm_diffusers.data import parse_mapping
    from dpdm_diffusers.training.config import render_command
    from dpdm_diffusers.training.finetune import base_objective, finetune_config
    from dpdm_diffusers.training.train_dpdm import run

    try:
        objective = base_objective(model)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--model") from None
    try:  # data problems, here and in the run: a message, not a traceback
        cfg = finetune_config(
            high_res, output_dir=output_dir, model=model, variable=variable, static=static, static_map=static_map,
            low_res=low_res, train_time=train_time, validation_time=validation_time, lat_box=lat_box,
            lon_box=lon_box, validation_lat_box=validation_lat_box, validation_lon_box=validation_lon_box,
            steps=steps, regression_steps=regression_steps, batch_size=batch_size, learning_rate=learning_rate,
            seed=seed, regular_grid=regular_grid, config=config, resume=resume, objective=objective,
            **({"units": parse_mapping(unit)} if unit else {}),
            **({"recompute_statistics": True} if recompute_statistics else {}),
        )
        typer.echo("dpdm finetune runs: " + render_command(cfg))
        out = run(cfg)
    except (KeyError, ValueError) as err:
        raise typer.BadParameter(str(err).strip("'\"")) from None
    typer.echo(f"fine-tuned model in {out}")


@app.command()
def train(
    high_res: list[str] = typer.Argument(..., help="Your high-res files: netCDF or zarr, globs allowed (quote them)."),
    output_dir: Path = typer.Option(..., "--output-dir", "-o", help="Folder of the new model (checkpoints too)."),
    variables: str | None = typer.Option(None, help="Variables to downscale, e.g. 2t,10u,10v,sp,tp (default: all)."),
    unit: list[str] = typer.Option([], "--unit", help="Units of a variable whose file has none, or to convert to, "
                                   "e.g. tp=mm (repeatable)."),
    objective: str = typer.Option("two-stage", help="two-stage (regression mean + residual diffusion), diffusion or "
                                  "regression."),
    static: list[str] = typer.Option([], "--static", help="Static field file per channel, e.g. topography=orog.nc "
                                     "(default: packaged global data)."),
    static_map: list[str] = typer.Option([], "--static-map", help="Name in a --static file = channel, e.g. "
                                         "orog=topography."),
    low_res: list[str] = typer.Option([], "--low-res", help="A real low-res source (default: block means)."),
    scale_factor: int = typer.Option(4, min=1, help="Grid refinement (block size of the low-res)."),
    train_time: str | None = typer.Option(None, help="Training period start,end (inclusive)."),
    validation_time: str | None = typer.Option(None, help="Validation period start,end: scores, spread calibration."),
    lat_box: str | None = typer.Option(None, help="Region south,north."),
    lon_box: str | None = typer.Option(None, help="Region west,east (your longitude convention is kept)."),
    validation_lat_box: str | None = typer.Option(None, help="Spatial validation box south,north (few time steps)."),
    validation_lon_box: str | None = typer.Option(None, help="Spatial validation box west,east."),
    preset: str = typer.Option("fast", help="UNet size: tiny, fast, small or paper."),
    interpolation: str | None = typer.Option(None, help="bilinear, bicubic or one per variable, e.g. "
                                             "bicubic,bilinear (default: bicubic)."),
    transforms: str | None = typer.Option(None, help="One per variable: identity, log1p, sqrt (default: log1p for "
                                          "precipitation)."),
    dry_threshold: list[str] = typer.Option([], "--dry-threshold", help="variable=amount below which output is 0 "
                                            "(default 0.1 mm for precipitation)."),
    steps: int = typer.Option(1000, min=1, help="Training steps (of each stage)."),
    regression_steps: int | None = typer.Option(None, min=1, help="Steps of the regression stage (default --steps)."),
    batch_size: int = typer.Option(16, min=1, help="Patches per step."),
    learning_rate: float = typer.Option(2e-4, min=0.0, help="AdamW learning rate."),
    seed: int = typer.Option(0),
    regular_grid: bool = typer.Option(False, help="Put near-regular (e.g. Gaussian) latitudes on a regular grid."),
    config: Path | None = typer.Option(None, exists=True, help="YAML with any other training option."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --output-dir."),
):
    """Train a new model on your files in one command: a two-stage model (both stages, then its spread calibrated
    per variable on the validation split) by default. Same as `accelerate launch -m
    dpdm_diffusers.training.train_dpdm --two_stage true ...`, which scales to GPUs."""
    from dpdm_diffusers.training.config import render_command
    from dpdm_diffusers.training.finetune import train_config
    from dpdm_diffusers.training.train_dpdm import run

    try:
        cfg = train_config(
            high_res, output_dir=output_dir, variables=_items(variables), units=unit, objective=objective,
            static=static, static_map=static_map, low_res=low_res, scale_factor=scale_factor, train_time=train_time,
            validation_time=validation_time, lat_box=lat_box, lon_box=lon_box, validation_lat_box=validation_lat_box,
            validation_lon_box=validation_lon_box, unet_preset=preset,
            interpolation=(_items(interpolation) if interpolation and "," in interpolation else interpolation),
            transforms=_items(transforms), dry_threshold=dry_threshold, steps=steps,
            regression_steps=regression_steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
            regular_grid=regular_grid, config=config, resume=resume)
        typer.echo("dpdm train runs: " + render_command(cfg))
        out = run(cfg)
    except (KeyError, ValueError) as err:
        raise typer.BadParameter(str(err).strip("'\"")) from None
    typer.echo(f"trained model in {out}")


@app.command()
def demo(
    model: str = typer.Option(str(DEFAULT_MODEL), help="Pipeline folder (default: the shipped model)."),
    members: int = typer.Option(10, min=2, help="Ensemble size."),
    steps: int = typer.Option(10, min=1, help="Denoising steps of the fast sampler."),
    scheduler: str = typer.Option("dpmsolver++"),
    out_dir: Path = typer.Option(Path("outputs")),
    max_fields: int | None = typer.Option(None, help="Only the first N of the 13 test fields."),
    quick: bool = typer.Option(False, "--quick", help=f"A first look in about a minute on a laptop: {QUICK_DEMO['max_fields']} "
                               f"fields, {QUICK_DEMO['members']} members, {QUICK_DEMO['steps']} steps (overrides those "
                               "options; the scores are then noisier than the full demo's)."),
):
    """Downscale the held-out GloSea4 test month with the shipped model; print the table, write demo.nc/png."""
    from dpdm_diffusers.workflows import run_demo

    if quick:
        members, steps, max_fields = QUICK_DEMO["members"], QUICK_DEMO["steps"], QUICK_DEMO["max_fields"]
    try:
        res = run_demo(model, num_members=members, num_inference_steps=steps, scheduler=scheduler, out_dir=out_dir,
                       max_fields=max_fields)
    except FileNotFoundError as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(res.markdown)
    typer.echo(f"\nwrote {res.netcdf} and {res.figure}; demo took {res.seconds:.0f} s "
               f"(pipeline {res.pipeline_seconds:.0f} s for {res.fields} fields x {members} members)")


def main(argv: list[str] | None = None) -> None:
    """The ``dpdm`` entry point: errors are one line on stderr and exit status 1; ``--debug`` (anywhere on the
    command line) or ``DPDM_DEBUG=1`` shows the traceback instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DPDM_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="dpdm")
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - every error a user can cause ends as one line
        if debug:
            raise
        typer.echo(f"Error: {_one_line(err)} (dpdm --debug ... shows the traceback)", err=True)
        # zarr's writer tasks aborted by that error are reported by asyncio at exit, traceback and all, whenever the
        # event loop is collected late (under load): the one line above already says what happened
        import logging

        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
