"""What each ``dpdm`` command does, as library functions that a test (or a notebook) calls without the CLI.

The command line (:mod:`dpdm_diffusers.cli`) only parses options, calls one of these and prints the result;
``dpdm finetune`` is :func:`dpdm_diffusers.training.finetune.finetune_config` plus the training run.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "dpdm-glosea4-ts-x4"
DEFAULT_FIVE_VARIABLE_MODEL = REPO_ROOT / "models" / "dpdm-tigge-5var-x4"
DEFAULT_REGRESSION = REPO_ROOT / "models" / "regression-glosea4-ts-x4"
BENCHMARKS = ("glosea4-ts-x4",)


def check_benchmark(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; available: {', '.join(BENCHMARKS)}")


# ----------------------------------------------------------------------------------------------
# dpdm regrid
# ----------------------------------------------------------------------------------------------
def regrid_file(input: str | os.PathLike, output: str | os.PathLike, like: str | os.PathLike, *, scale_factor: int = 1,
                method: str = "bilinear", variables: Sequence[str] | None = None, time=None, overwrite: bool = False):
    """A regular lat/lon file (a GCM or reanalysis) on the coarse native grid of the rotated or projected file
    ``like``: its grid coarsened ``scale_factor`` times (trailing rows/columns trimmed to a multiple, as training
    does), so that ``dpdm downscale`` of the result lands on ``like``'s grid. ``method``: ``bilinear`` or
    ``conservative`` (:func:`dpdm_diffusers.data.regrid_to_native`). The output has ``like``'s axis names, 2-D
    lat/lon and grid mapping; ``variables`` and ``time`` (``(start, end)``) select from the input. Returns its path."""
    import xarray as xr

    from dpdm_diffusers import data
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.io import write_dataset
    from dpdm_diffusers.native_grids import output_coords

    like_path, in_path = Path(like), Path(input)
    raw_like = xr.open_dataset(like_path, engine="zarr" if like_path.suffix == ".zarr" else None, chunks={})
    target_ds = data.trim_to_multiple(data.standardize(raw_like), scale_factor)
    fine = Grid.from_xarray(target_ds)
    if fine.mapping is None:
        raise ValueError(f"{like_path} is on a regular lat/lon grid: dpdm regrid targets rotated or projected grids "
                         "(for lat/lon targets, dpdm downscale interpolates the input itself).")
    target = data.coarse_grid(fine, scale_factor)
    src = data.open_dataset(str(in_path), variables=variables, time=time)
    out = data.regrid_to_native(src, target, method)
    layout = data.input_layout(raw_like)
    y_attrs, x_attrs = raw_like[layout["y"]].attrs, raw_like[layout["x"]].attrs
    out = out.rename({"y": layout["y"], "x": layout["x"]})
    out = out.assign_coords(output_coords(target, layout["y"], layout["x"], y_attrs, x_attrs))
    step = (f"regridded from {in_path.name} ({method}) onto the {target.describe()} of {like_path.name} coarsened "
            f"{scale_factor}x by dpdm regrid")
    out.attrs["history"] = f"{src.attrs.get('history', '')}\n{step}".strip()  # CF: appended, the input's kept
    return write_dataset(out.load(), output, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# dpdm downscale
# ----------------------------------------------------------------------------------------------
def open_low_res(path: str | os.PathLike, variables: Sequence[str], variable_map: Mapping[str, str] | None = None,
                 layout: dict | None = None):
    """A low-res file (netCDF or zarr, opened lazily) with lat/lon/time standardised and only the model's
    ``variables`` kept, in your names (``variable_map``: yours -> the model's). ``layout``, when given, is filled
    with the file's own dim names and coordinate order (:func:`dpdm_diffusers.data.input_layout`)."""
    import xarray as xr

    from dpdm_diffusers.data import input_layout, standardize
    from dpdm_diffusers.naming import apply_variable_map

    path = Path(path)
    raw = xr.open_dataset(path, engine="zarr" if path.suffix == ".zarr" else None, chunks={})
    if layout is not None:
        layout.update(input_layout(raw))
    ds = standardize(raw)
    try:
        _, rename_back = apply_variable_map(ds, variable_map, variables)
    except KeyError as err:
        raise ValueError(f"{path}: {err}") from None
    return ds[[rename_back.get(v, v) for v in variables]]


def static_from_file(path, grid, channels: Sequence[str], static_map: Mapping[str, str] | None = None) -> dict:
    """The model's static ``channels`` on ``grid`` from your files: one file holding every channel, or
    ``{channel: file}`` for some of them (the others come from the packaged sources). A file on any regular lat/lon
    grid is area-averaged (over each cell's footprint on a rotated or projected grid); one on the target's own native
    grid is taken as it is. ``static_map`` maps the files' variable names to channels (``{"orog": "topography"}``)."""
    import xarray as xr

    from dpdm_diffusers.static_fields import get_static_fields

    if isinstance(path, Mapping):
        unknown = sorted(set(path) - set(channels))
        if unknown:
            raise ValueError(f"--static names {unknown}, which this model does not take; its static channels are "
                             f"{list(channels)}.")
        sources = {c: xr.open_dataset(p) for c, p in path.items()}
    else:
        sources = {c: xr.open_dataset(path) for c in channels}
    return dict(get_static_fields(grid, list(channels), sources=sources, rename=dict(static_map or {})).data_vars)


def downscale_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: str = str(DEFAULT_MODEL),
    num_members: int = 10,
    num_inference_steps: int = 10,
    scheduler: str = "dpmsolver++",
    seed: int = 0,
    chunk_size: int = 12,
    write_members: bool = True,
    stats: bool = True,
    tiles_per_call: int | None = None,
    conserve: bool = False,
    static: str | os.PathLike | Mapping[str, str] | None = None,
    variable_map: Mapping[str, str] | None = None,
    static_map: Mapping[str, str] | None = None,
    device: str = "auto",
    dtype: str = "fp32",
    channels_last: bool = True,
    compile: bool = False,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    noise_time_correlation: float | None = None,
):
    """``dpdm downscale``: stream a low-res file through a model into ``output`` (resumable, multi-process); see
    :func:`dpdm_diffusers.reconstruct.reconstruct`. Returns its :class:`~dpdm_diffusers.reconstruct.
    ReconstructionResult`."""
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.evaluation import set_scheduler
    from dpdm_diffusers.grids import Grid
    from dpdm_diffusers.reconstruct import process_state, reconstruct
    from dpdm_diffusers.speed import apply_fast_paths

    if Path(output).exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it.")
    dev = process_state().device if device == "auto" else device
    pipe = set_scheduler(DownscalingPipeline.from_pretrained(model), scheduler)
    apply_fast_paths(pipe, device=dev, dtype=dtype, channels_last=channels_last, compile=compile, threads=threads)
    layout: dict = {}
    ds = open_low_res(input, list(pipe.config.variables), variable_map, layout)
    static_fields = None
    if static:  # one file with every channel, or {channel: file}
        grid = Grid.from_xarray(ds).refine(pipe.config.scale_factor)
        static_fields = static_from_file(static, grid, list(pipe.config.static_channels), static_map)
    return reconstruct(pipe, ds, output, num_members=num_members, num_inference_steps=num_inference_steps, seed=seed,
                       chunk_size=chunk_size, static_fields=static_fields, variable_map=variable_map,
                       tiles_per_call=tiles_per_call, members=write_members, stats=stats, overwrite=overwrite,
                       progress=progress, model_id=model, conserve=conserve,
                       noise_time_correlation=noise_time_correlation, output_layout=layout)


# ----------------------------------------------------------------------------------------------
# dpdm evaluate
# ----------------------------------------------------------------------------------------------
def evaluate_benchmark(model: str = str(DEFAULT_MODEL), *, benchmark: str = "glosea4-ts-x4",
                       members: Sequence[int] = (1, 10), baselines: Sequence[str] = (),
                       regression_model: str | None = str(DEFAULT_REGRESSION), **kwargs):
    """``dpdm evaluate``: the benchmark's table (RMSE/ACC/SSIM/PSNR, CRPS, spread-skill per region) for ``model``
    beside the named ``baselines`` (:data:`dpdm_diffusers.evaluation.BASELINES` and ``"regression"``, which scores
    ``regression_model`` when it is a local folder or a Hub id). Other options go to
    :func:`dpdm_diffusers.evaluation.evaluate_glosea4`."""
    from dpdm_diffusers.evaluation import BASELINES, evaluate_glosea4

    check_benchmark(benchmark)
    allowed = {*BASELINES, "regression"}
    unknown = sorted(set(baselines) - allowed)
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; use {', '.join(sorted(allowed))}")
    reg = None
    if "regression" in baselines and regression_model:
        looks_like_hub_id = regression_model.count("/") == 1 and not regression_model.startswith((".", "/"))
        reg = regression_model if Path(regression_model).exists() or looks_like_hub_id else None  # else: skipped
    return evaluate_glosea4(model, members=list(members), baselines=[b for b in baselines if b != "regression"],
                            regression_model=reg, **kwargs)


# ----------------------------------------------------------------------------------------------
# dpdm calibrate
# ----------------------------------------------------------------------------------------------
def calibration_data(pipe, high_res: Sequence[str] | None = None, *, benchmark: str = "glosea4-ts-x4",
                     validation_time: Sequence[str] = (), variable_map: Mapping[str, str] | None = None,
                     lat_box: Sequence[float] = (), lon_box: Sequence[float] = (), low_res: Sequence[str] = (),
                     max_samples: int = 16, units: Mapping[str, str] | None = None, regular_grid: bool = False,
                     static_files: Mapping[str, str] | None = None, static_map: Mapping[str, str] | None = None):
    """``(low, truth, static_fields)`` to calibrate ``pipe``'s spread on: your high-res files (all of them, or
    ``validation_time``; block means unless a real ``low_res`` source is given), or the benchmark's validation
    split when no files are given. ``units``, ``regular_grid``, ``static_files``, ``static_map``: as for
    :func:`dpdm_diffusers.user_data.load_region` (declared units, Gaussian grids, your static fields)."""
    if not high_res:
        from dpdm_diffusers.glosea4 import load_glosea4_benchmark

        check_benchmark(benchmark)
        bench = load_glosea4_benchmark()
        truth, low = bench.split("validation")
        return low, truth, bench.static

    import warnings

    from dpdm_diffusers.user_data import load_region, validation_inputs

    cfg = pipe.config
    with warnings.catch_warnings():  # "no validation split" is not news here: all of the files is the split
        warnings.simplefilter("ignore", UserWarning)
        region = load_region(
            list(high_res), scale_factor=cfg.scale_factor, low_res=list(low_res) or None,
            variables=list(cfg.variables), variable_map=dict(variable_map or {}),
            units=dict(zip(cfg.variables, cfg.units)), declared_units=units, lat_box=list(lat_box),
            lon_box=list(lon_box), regular_grid=regular_grid, static_channels=list(cfg.static_channels),
            static_files=static_files, static_map=static_map, validation_time=list(validation_time),
        )
    if region.validation is None:
        region.validation = {}  # every field of the files
    return validation_inputs(region, max_samples)


def _trained_on_validation_month(model) -> bool:
    """Whether a local model's training range (its ``training_config.yaml``) covers the benchmark's validation month."""
    import pandas as pd
    import yaml

    from dpdm_diffusers import glosea4

    path = Path(model) / "training_config.yaml"
    if not path.is_file():
        return False
    train = (yaml.safe_load(path.read_text()) or {}).get("train_time") or []
    if len(train) != 2:
        return False
    start = pd.Timestamp(glosea4.SPLITS["validation"][0]).to_period("M")
    end = pd.Timestamp(glosea4.SPLITS["validation"][1]).to_period("M")
    lo, hi = (pd.Timestamp(str(t)).to_period("M") for t in train)
    return lo <= end and hi >= start


def calibrate_model(model: str = str(DEFAULT_MODEL), high_res: Sequence[str] | None = None, *, num_members: int = 8,
                    num_inference_steps: int = 10, target: str = "ssr", seed: int = 0, write: bool = False,
                    scheduler: str | None = None, **data_options) -> dict:
    """``dpdm calibrate``: the factor on a two-stage model's ``stochastic_std`` that gives spread-skill 1 (``ssr``)
    or the lowest fair CRPS (``crps``) on validation data (:func:`calibration_data` takes ``data_options``).
    With ``write``, the calibrated ``stochastic_std`` is stored in the folder's ``model_index.json`` (returned as
    ``"written"``)."""
    from dpdm_diffusers import DownscalingPipeline
    from dpdm_diffusers.calibration import TARGETS, calibrate_spread, write_stochastic_std

    if target not in TARGETS:  # before loading anything or sampling
        raise ValueError(f"Unknown calibration target {target!r}; use one of {TARGETS}.")
    if not Path(model).exists() and write:
        raise FileNotFoundError(f"{model} is not a local pipeline folder; --write needs one.")
    from dpdm_diffusers.evaluation import set_scheduler

    pipe = DownscalingPipeline.from_pretrained(model)
    if scheduler is not None:  # the spread depends on the sampler: calibrate for the one you sample with
        set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    low, truth, static = calibration_data(pipe, high_res, **data_options)
    if not high_res and _trained_on_validation_month(model):
        warnings.warn(f"{model} was trained on the benchmark's validation month (its training_config.yaml), so this "
                      "calibration is in-sample: the spread will look right on data the model has seen. Calibrate on "
                      "held-out files of yours instead.", stacklevel=2)
    res = calibrate_spread(pipe, low, truth, static_fields=static, num_members=num_members,
                           num_inference_steps=num_inference_steps, seed=seed, target=target)
    if write:
        res["written"] = str(write_stochastic_std(model, res["stochastic_std"]))
    return res


# ----------------------------------------------------------------------------------------------
# dpdm demo
# ----------------------------------------------------------------------------------------------
@dataclass
class DemoResult:
    markdown: str
    netcdf: Path
    figure: Path
    seconds: float
    pipeline_seconds: float
    fields: int


def run_demo(model: str = str(DEFAULT_MODEL), *, num_members: int = 10, num_inference_steps: int = 10,
             scheduler: str = "dpmsolver++", out_dir: str | os.PathLike = "outputs",
             max_fields: int | None = None) -> DemoResult:
    """``dpdm demo``: downscale the held-out GloSea4 test month with a local model, score it per region against
    Lerp (and the shipped regression baseline), and write ``demo.nc`` (members, mean, spread, truth, Lerp) and
    ``demo.png`` (maps of one field) to ``out_dir``."""
    from dpdm_diffusers import plots
    from dpdm_diffusers.evaluation import evaluate_glosea4
    from dpdm_diffusers.io import write_dataset

    t0 = time.perf_counter()
    if not Path(model).exists():
        raise FileNotFoundError(f"model folder {model} not found (the demo runs offline on a local folder)")
    out_dir = Path(out_dir)
    from dpdm_diffusers import tigge

    if list(json.loads((Path(model) / "model_index.json").read_text())["variables"]) == tigge.VARIABLES:
        return run_five_variable_demo(model, num_members=num_members, num_inference_steps=num_inference_steps,
                                      out_dir=out_dir)
    reg = str(DEFAULT_REGRESSION) if DEFAULT_REGRESSION.exists() else None
    result = evaluate_glosea4(model, members=(1, num_members), baselines=("lerp",), regression_model=reg,
                              scheduler=scheduler, num_inference_steps=num_inference_steps, max_fields=max_fields,
                              regions=("global", "east_asia", "gulf_coast", "northern_australia"))
    ens = result.members
    ds = ens.to_dataset(name="surface_temperature")
    ds["surface_temperature_mean"] = ens.mean("member").assign_attrs(ens.attrs, cell_methods="member: mean")
    ds["surface_temperature_std"] = ens.std("member", ddof=1).assign_attrs(
        units="K", cell_methods="member: standard_deviation")
    ds["truth"] = result.truth
    ds["lerp"] = result.lerp
    nc = write_dataset(ds, out_dir / "demo.nc", overwrite=True)
    one = dict(realization=0, time=0)
    png = plots.plot_maps(
        result.truth.isel(one), result.lerp.isel(one), ens.isel(member=0, **one), ens.isel(**one).mean("member"),
        ens.isel(**one).std("member", ddof=1), out_dir / "demo.png",
        title=f"GloSea4 surface temperature 2012-01: DPDM x4, {num_members} members", units="K",
        land_fraction=result.land_fraction,
    )
    return DemoResult(markdown=result.markdown, netcdf=Path(nc), figure=Path(png), seconds=time.perf_counter() - t0,
                      pipeline_seconds=result.timings["pipeline_s"], fields=result.config["fields"])


def run_five_variable_demo(model: str = str(DEFAULT_FIVE_VARIABLE_MODEL), *, num_members: int = 10,
                           num_inference_steps: int = 10, out_dir: str | os.PathLike = "outputs") -> DemoResult:
    """``dpdm demo --model models/dpdm-tigge-5var-x4``: downscale the TIGGE test box (never seen in training; shipped
    with the model as ``test_box.nc``) into 2t, 10u, 10v, sp and tp members, score them per variable against
    interpolation, and write ``demo_five.nc`` and ``demo_tp.png`` (truth, bicubic and precipitation members)."""
    from dpdm_diffusers import DownscalingPipeline, plots, tigge
    from dpdm_diffusers.file_evaluation import forecasts_from_pipeline, score_fields
    from dpdm_diffusers.io import write_dataset

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    sample = Path(model) / tigge.SAMPLE_FILE
    test = tigge.load_test_sample(sample) if sample.exists() else tigge.test_split()
    pipe = DownscalingPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    t1 = time.perf_counter()
    forecasts = forecasts_from_pipeline(pipe, test.low_res, test.static, members=(1, num_members),
                                        num_inference_steps=num_inference_steps, label="DPDM")
    pipeline_s = time.perf_counter() - t1
    scores = score_fields(test.truth, forecasts, scale_factor=tigge.SCALE_FACTOR, precipitation=["tp"])
    ens = forecasts[f"DPDM, {num_members} members"]
    ds = ens.copy()
    for v in tigge.VARIABLES:
        ds[f"{v}_mean"] = ens[v].mean("member").assign_attrs(ens[v].attrs, cell_methods="member: mean")
        ds[f"{v}_truth"] = test.truth[v]
    nc = write_dataset(ds, out_dir / "demo_five.nc", overwrite=True)
    png = plots.plot_member_maps(
        test.truth.tp, forecasts["bicubic"].tp, [ens.tp.isel(member=k) for k in range(min(4, num_members))],
        out_dir / "demo_tp.png", units="mm (120 h)", cmap="YlGnBu", gamma=0.5,
        title=f"TIGGE test box, precipitation over 120 h: truth, bicubic and DPDM members (x{pipe.config.scale_factor})")
    return DemoResult(markdown=scores.markdown(), netcdf=Path(nc), figure=Path(png), seconds=time.perf_counter() - t0,
                      pipeline_seconds=pipeline_s, fields=1)
