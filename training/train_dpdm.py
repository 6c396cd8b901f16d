#!/usr/bin/env python
# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""Train or fine-tune a DPDM downscaling model with Accelerate (in the style of diffusers' examples).

    accelerate launch -m dpdm_diffusers.training.train_dpdm --config training/configs/glosea4_ts_x4.yaml
    accelerate launch -m dpdm_diffusers.training.train_dpdm --config my_region.yaml --init_from path/or/hub-id
    torchrun --nproc_per_node 2 -m dpdm_diffusers.training.train_dpdm --config ...   # 2 CPU processes (gloo)

Every option of the YAML config can be overridden on the command line (``--max_train_steps 500``).
The run leaves a ``DownscalingPipeline.save_pretrained`` folder in ``output_dir`` (EMA weights, model
card) and ``checkpoint-N`` folders that ``--resume_from_checkpoint latest`` continues from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import yaml

logger = logging.getLogger("dpdm_diffusers.training")

COMPLETE_MARKER = "checkpoint_complete.json"


# Sizes, counts and rates are validated by pydantic (YAML's "1e-4" is a string, "false" is truthy in Python):
# a wrong type or an impossible value is refused with the option named, before anything runs.
positive = Annotated[int, Field(gt=0)]
non_negative = Annotated[int, Field(ge=0)]
rate = Annotated[float, Field(ge=0)]


@dataclass(config=ConfigDict(extra="forbid"))
class TrainingConfig:
    # data ---------------------------------------------------------------------------------------
    dataset: Literal["files", "glosea4-ts-x4"] = "files"  # "files" or "glosea4-ts-x4"
    high_res: list[str] = field(default_factory=list)  # netCDF/zarr paths or globs (dataset=files)
    low_res: list[str] = field(default_factory=list)  # optional real low-res source; default: block-mean
    variables: list[str] = field(default_factory=list)  # default: every variable of the files (or the base model's)
    variable_map: dict = field(default_factory=dict)  # your names -> the model's, e.g. {air_temperature: surface_temperature}
    transforms: list[str] = field(default_factory=list)  # default: log1p for precipitation, else identity
    scale_factor: positive | None = None  # default: the base model's, else 4
    train_time: list[str] = field(default_factory=list)  # [start, end], inclusive
    validation_time: list[str] = field(default_factory=list)
    validation_lat_box: list[float] = field(default_factory=list)  # spatial validation box (few time steps):
    validation_lon_box: list[float] = field(default_factory=list)  # left out of the training loss, scored alone
    lat_box: list[float] = field(default_factory=list)  # [south, north]
    lon_box: list[float] = field(default_factory=list)  # [west, east], may cross the dateline
    regular_grid: bool = False  # put near-regular (e.g. Gaussian) latitudes on a regular grid, conservatively
    static_channels: list[str] | None = None  # default: the base model's, else [topography, land_sea_mask]
    static_files: dict = field(default_factory=dict)  # {channel: path}; default: packaged global data
    static_map: dict = field(default_factory=dict)  # names in static_files -> channels, e.g. {orog: topography}
    # model --------------------------------------------------------------------------------------
    unet_preset: str | None = None  # default "small"; fine-tuning keeps the base model's architecture
    patch_size: positive | None = None  # default: the base model's, else 64
    prediction: Literal["residual", "full"] | None = None  # default: the base model's, else "residual"
    interpolation: Literal["bilinear", "bicubic"] | None = None  # default: the base model's, else "bilinear"
    objective: Literal["diffusion", "regression"] = "diffusion"  # or "regression" (deterministic baseline, same UNet)
    # two-stage (CorrDiff) model: a trained regression pipeline whose prediction is the mean; the diffusion
    # UNet learns what it misses, divided by its RMS (stochastic_std, from `stochastic_std_batches` batches)
    regression_model: str | None = None
    stochastic_std_batches: positive = 32
    # multiplies the stochastic_std the members are sampled with (not the scale the UNet learns), e.g. a factor
    # calibrated on held-out data by a run of the same recipe (for a refit that keeps no validation split)
    spread_factor: Annotated[float, Field(gt=0)] = 1.0
    # after training, scale stochastic_std on the validation split (dpdm_diffusers.calibration) to `calibration_target`;
    # default (None): on for two-stage models whenever there is a validation split
    calibrate_spread: bool | None = None
    calibration_target: Literal["ssr", "crps"] = "ssr"  # "ssr": spread-skill 1 on validation; "crps": lowest fair CRPS (narrower)
    calibration_members: Annotated[int, Field(ge=2)] = 8
    calibration_max_samples: positive = 16
    # fine-tuning: a pretrained pipeline folder or Hub id. A two-stage base is fine-tuned as one: stage 1 (its
    # regression UNet, `regression_steps` steps) in output_dir/stage1-regression, then stage 2 (its diffusion UNet
    # on the new regression) with stochastic_std re-estimated and the spread calibrated on the validation split
    init_from: str | None = None
    regression_steps: positive | None = None  # two-stage fine-tuning: steps of stage 1 (default: max_train_steps)
    recompute_statistics: bool = False  # fine-tuning: keep the base model's statistics unless set
    # optimisation -------------------------------------------------------------------------------
    max_train_steps: positive = 1000
    train_batch_size: positive = 16
    learning_rate: rate = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: non_negative = 100
    adam_weight_decay: rate = 1e-2
    max_grad_norm: rate = 1.0
    gradient_accumulation_steps: positive = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # "no" | "fp16" | "bf16"
    use_ema: bool = True
    ema_decay: Annotated[float, Field(ge=0, le=1)] = 0.999
    ema_warmup: bool = True  # decay grows as 1 - (1 + step)^-3/4 up to ema_decay, so early weights fade fast
    seed: int = 0
    dataloader_num_workers: non_negative = 0
    # cut patches on the training device (fields held there, a batch per gather) instead of a CPU DataLoader;
    # default (None): whenever the fields are in memory and take at most a quarter of the device's free memory
    patches_on_device: bool | None = None
    logging_steps: positive = 10  # loss/lr logged every N steps: reading the loss waits for the GPU
    # checkpoints, validation, logging -----------------------------------------------------------
    output_dir: str = "runs/dpdm"
    checkpointing_steps: non_negative = 250
    checkpoints_total_limit: positive | None = 3
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    validation_steps: non_negative = 250
    validation_members: positive = 4
    validation_inference_steps: positive = 10
    validation_max_samples: positive = 4
    report_to: str = "tensorboard"  # "tensorboard" | "none" (tensorboard only when installed)
    push_to_hub: bool = False
    hub_model_id: str | None = None
    model_card_title: str = "DPDM downscaling model"
    stop_after_steps: positive | None = None  # end this invocation early (pieces of a long run); resume later


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def _parse_value(raw: str, annotation: str):
    """A command-line string for one option: lists and maps are split here; scalars are left to pydantic,
    which converts "4", "1e-4" or "false" and refuses what does not fit the option's type."""
    if raw.lower() == "none" and "None" in annotation:
        return None
    if annotation.startswith("list"):
        return [x for x in raw.split(",") if x != ""]
    if annotation.startswith("dict"):
        if raw.strip().startswith("{"):
            return json.loads(raw)
        from dpdm_diffusers.data import parse_mapping

        return parse_mapping(raw)  # a=b,c=d
    return raw


def parse_args(argv=None) -> TrainingConfig:
    """YAML config first, then command-line overrides for any field."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML file with any of the options below.")
    fields = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    for name, f in fields.items():
        parser.add_argument(f"--{name}", type=str, default=None, help=f"{f.type} (default from config/{name})")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        with open(args.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            parser.error(f"unknown option(s) in {args.config}: {unknown}")
        values.update(loaded)
    for name, f in fields.items():
        raw = getattr(args, name)
        if raw is not None:
            try:
                values[name] = _parse_value(raw, str(f.type))
            except ValueError as err:
                parser.error(f"--{name}: {err}")
    try:
        return TrainingConfig(**values)
    except ValidationError as err:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in err.errors())
        parser.error(f"invalid options: {problems}")


# ----------------------------------------------------------------------------------------------
# start-up checks: every inconsistent combination is refused here, never at the first validation
# ----------------------------------------------------------------------------------------------
MODEL_DEFAULTS = {"scale_factor": 4, "patch_size": 64, "prediction": "residual", "interpolation": "bilinear",
                  "static_channels": ["topography", "land_sea_mask"], "unet_preset": "small"}


def model_kind(config: dict) -> str:
    """``"two-stage"``, ``"diffusion"`` or ``"regression"`` from a pipeline's ``model_index.json``."""
    reg = config.get("regression_unet")
    if isinstance(reg, (list, tuple)) and reg and reg[0] is not None:
        return "two-stage"
    return "regression" if config.get("objective") == "regression" else "diffusion"


def _load_config(path: str) -> dict:
    from dpdm_diffusers import DownscalingPipeline

    try:
        return dict(DownscalingPipeline.load_config(path))
    except Exception as err:  # missing folder, no model_index.json, offline Hub id ...
        raise ValueError(f"Cannot read the pipeline config of {path!r}: {err}") from err


def resolve_options(cfg: TrainingConfig) -> tuple[TrainingConfig, str | None]:
    """Fill model settings from the base model (or the defaults) and refuse what cannot work together.

    Returns the resolved config and the base model's kind (``None`` when training from scratch).
    """
    base = _load_config(cfg.init_from) if cfg.init_from else None
    reg = _load_config(cfg.regression_model) if cfg.regression_model else None
    kind = model_kind(base) if base is not None else None
    problems = []
    if cfg.objective not in ("diffusion", "regression"):
        problems.append(f"--objective must be 'diffusion' or 'regression', got {cfg.objective!r}")
    if reg is not None and model_kind(reg) != "regression":
        problems.append(f"--regression_model {cfg.regression_model} is a {model_kind(reg)} model; it must be trained "
                        "with --objective regression")
    if kind == "diffusion" and cfg.objective == "regression":
        problems.append(f"--init_from {cfg.init_from} is a diffusion model and has no regression UNet to fine-tune with "
                        "--objective regression; train a regression model from scratch (no --init_from) instead")
    if kind == "regression" and cfg.objective == "diffusion" and not cfg.regression_model:
        problems.append(f"--init_from {cfg.init_from} is a regression model: fine-tune it with --objective regression, "
                        f"or train a two-stage diffusion model on it with --regression_model {cfg.init_from}")
    if cfg.init_from and cfg.unet_preset and base is not None:
        from diffusers import UNet2DModel

        from dpdm_diffusers.modeling import preset_of

        base_preset = preset_of(UNet2DModel.load_config(cfg.init_from, subfolder="unet"))
        if base_preset != cfg.unet_preset:
            problems.append(f"--unet_preset {cfg.unet_preset} differs from the base model's UNet ({base_preset or 'custom'}); "
                            "fine-tuning keeps the base model's architecture (leave --unet_preset out)")
    source = base if base is not None else reg
    for key, default in MODEL_DEFAULTS.items():
        if key == "unet_preset":
            continue
        mine = getattr(cfg, key)
        theirs = source.get(key) if source is not None else None
        if theirs is not None and mine is not None and list(np.atleast_1d(mine)) != list(np.atleast_1d(theirs)):
            which = "--init_from" if base is not None else "--regression_model"
            problems.append(f"--{key} {mine} differs from the {theirs} of {which} (leave it out to use the model's)")
        if mine is None:
            setattr(cfg, key, list(theirs) if isinstance(theirs, (list, tuple)) else theirs if theirs is not None else default)
    if cfg.unet_preset is None:
        cfg.unet_preset = MODEL_DEFAULTS["unet_preset"]
    if cfg.patch_size is not None and cfg.patch_size <= 0:
        problems.append(f"--patch_size must be positive, got {cfg.patch_size}")
    if cfg.regression_model and cfg.objective != "diffusion":
        problems.append("--regression_model is the mean of a two-stage diffusion model; it needs --objective diffusion")
    if cfg.regression_model and cfg.recompute_statistics:
        problems.append("--regression_model fixes the statistics (the regression model's); fine-tune it first to change them")
    has_validation = bool(cfg.validation_time or cfg.validation_lat_box or cfg.validation_lon_box)
    if cfg.dataset == "glosea4-ts-x4":
        has_validation = has_validation or glosea4_splits(cfg)[1] is not None
    two_stage = cfg.objective == "diffusion" and (kind == "two-stage" or cfg.regression_model is not None)
    if cfg.calibrate_spread and not two_stage:
        problems.append("--calibrate_spread scales a two-stage model's stochastic_std; this run trains no two-stage model")
    if cfg.calibrate_spread and not has_validation:
        problems.append("--calibrate_spread needs a validation split (validation_time or validation_lat_box/lon_box)")
    if cfg.calibration_target not in ("ssr", "crps"):
        problems.append(f"--calibration_target must be 'ssr' or 'crps', got {cfg.calibration_target!r}")
    if cfg.regression_steps is not None and kind != "two-stage":
        problems.append("--regression_steps is the stage-1 length of fine-tuning a two-stage --init_from model")
    if cfg.push_to_hub and not cfg.hub_model_id:
        problems.append("--push_to_hub needs --hub_model_id")
    if problems:
        raise SystemExit("Inconsistent options:\n  - " + "\n  - ".join(problems))
    return cfg, kind


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def glosea4_splits(cfg: TrainingConfig) -> tuple[tuple[str, str], tuple[str, str] | None]:
    """Train and validation month ranges of the benchmark: its own splits unless ``train_time`` /
    ``validation_time`` say otherwise (e.g. a refit on training + validation months once the settings
    are fixed). Refuses any range that reaches the test month."""
    import pandas as pd

    from dpdm_diffusers import glosea4

    def month(text) -> pd.Period:
        return pd.Timestamp(text).to_period("M")

    train = tuple(cfg.train_time) if cfg.train_time else glosea4.SPLITS["train"]
    if cfg.validation_time:
        val = tuple(cfg.validation_time)
    elif cfg.train_time and month(train[-1]) >= month(glosea4.SPLITS["validation"][0]):
        val = None  # the validation month is trained on: no validation split is left
    else:
        val = glosea4.SPLITS["validation"]
    test_start = month(glosea4.SPLITS["test"][0])
    for name, rng in (("train_time", train), ("validation_time", val)):
        if rng is not None and (len(rng) != 2 or month(rng[1]) >= test_start):
            raise ValueError(f"--{name} {list(rng)} reaches the {glosea4.NAME} test month {test_start}: the test month "
                             "is never trained or validated on.")
    return train, val


def load_pairs(cfg: TrainingConfig, units: dict | None = None):
    """The region's pairs, static fields and splits (:class:`dpdm_diffusers.user_data.RegionData`).

    ``units``: the model's units per variable when fine-tuning (data in compatible units is converted).
    """
    from dpdm_diffusers import user_data

    if cfg.dataset == "glosea4-ts-x4":
        from dpdm_diffusers import glosea4

        bench = glosea4.load_glosea4_benchmark(static=bool(cfg.static_channels))
        train_rng, val_rng = glosea4_splits(cfg)
        split = {"train": {"time": slice(*train_rng)}, "validation": None if val_rng is None else {"time": slice(*val_rng)}}
        n_fields = {k: 0 if v is None else bench.high_res.sel(**v).sizes["time"] * bench.high_res.sizes["member"]
                    for k, v in split.items()}
        describe = {
            "source": "GloSea4 surface_temperature, 13 members x 6 months (iris-sample-data, Open Government Licence)",
            "benchmark": f"{glosea4.NAME} (DATA.md): 144x192 N96 truth, 4x4 block-mean low-res 36x48",
            "train": f"{train_rng[0]} .. {train_rng[1]} ({n_fields['train']} fields)",
            "validation": "none" if val_rng is None else f"{val_rng[0]} .. {val_rng[1]} ({n_fields['validation']} fields)",
            "test": "2012-01 (13 fields, never trained or validated on)",
            "static fields": "topography (pvlib Altitude.h5) and land fraction (global-land-mask), area-averaged",
        }
        static = bench.static[cfg.static_channels] if bench.static is not None else None
        vbox = None
        if cfg.validation_lat_box or cfg.validation_lon_box:
            vbox = user_data.box_indices(bench.grid, bench.scale_factor, cfg.validation_lat_box, cfg.validation_lon_box)
        return user_data.RegionData(bench, static, split["train"], split["validation"], vbox, describe)
    if cfg.dataset != "files":
        raise ValueError(f"Unknown dataset {cfg.dataset!r}; use 'files' or 'glosea4-ts-x4'.")
    if not cfg.high_res:
        raise ValueError("dataset=files needs --high_res paths (netCDF or zarr, globs allowed).")
    return user_data.load_region(
        cfg.high_res, low_res=cfg.low_res or None, scale_factor=cfg.scale_factor,
        variables=list(units) if units else (cfg.variables or None), variable_map=cfg.variable_map, units=units,
        lat_box=cfg.lat_box, lon_box=cfg.lon_box, regular_grid=cfg.regular_grid,
        static_channels=cfg.static_channels, static_files=cfg.static_files, static_map=cfg.static_map,
        train_time=cfg.train_time, validation_time=cfg.validation_time,
        validation_lat_box=cfg.validation_lat_box, validation_lon_box=cfg.validation_lon_box,
    )


def build_statistics(cfg, pairs, static, train, base_config=None, exclude_box=None) -> dict:
    """Statistics on the training split (outside a validation box), or the base model's when fine-tuning keeps them."""
    from dpdm_diffusers.statistics import compute_statistics

    if base_config is not None and not cfg.recompute_statistics:
        keys = ("variables", "units", "transforms", "norm_mean", "norm_std", "residual_std",
                "static_channels", "static_mean", "static_std")
        stats = {k: list(base_config[k]) for k in keys}
        missing = [v for v in stats["variables"] if v not in pairs.high_res.data_vars]
        if missing:
            raise ValueError(f"The base model downscales {stats['variables']}, the data lacks {missing}.")
        return stats
    lerp = pairs.lerp(cfg.interpolation)
    mask = None
    if exclude_box is not None:
        import xarray as xr

        keep = np.ones(pairs.grid.shape, dtype=bool)
        keep[exclude_box] = False
        mask = xr.DataArray(keep, dims=("lat", "lon"), coords={"lat": pairs.high_res["lat"], "lon": pairs.high_res["lon"]})
    stats = compute_statistics(
        pairs.high_res, lerp, variables=list(pairs.high_res.data_vars), transforms=cfg.transforms or None,
        train=train or None, static=static, static_channels=cfg.static_channels or None, mask=mask,
    )
    stats.setdefault("static_channels", [])
    stats.setdefault("static_mean", [])
    stats.setdefault("static_std", [])
    return stats


def load_regression_model(path: str, base=None):
    """The frozen mean model of a two-stage run; it must share the diffusion model's data settings."""
    from dpdm_diffusers import DownscalingPipeline

    reg = DownscalingPipeline.from_pretrained(path)
    if reg.config.objective != "regression":
        raise ValueError(f"--regression_model {path} has objective {reg.config.objective!r}; train it with --objective regression.")
    if base is not None:
        keys = ("variables", "static_channels", "scale_factor", "patch_size", "prediction", "interpolation")
        diff = [k for k in keys if list(np.atleast_1d(base.config[k])) != list(np.atleast_1d(reg.config[k]))]
        if diff:
            raise ValueError(f"--regression_model {path} and --init_from differ in {diff}; they must share one data layout.")
    return reg


def regression_forward(unet, target, cond):
    """A regression UNet's prediction: one pass at t = 0 on zero noise (how the pipeline runs it too)."""
    t0 = torch.zeros(target.shape[0], dtype=torch.long, device=target.device)
    return unet(torch.cat([torch.zeros_like(target), cond], dim=1), t0).sample


@torch.no_grad()
def regression_residual_rms(reg_unet, dataset, num_batches: int, batch_size: int, device) -> list[float]:
    """Per-variable RMS of (model-space target - regression prediction) over training patches: the scale
    of what the diffusion stage generates. Deterministic (epoch-0 crops), so a resumed run gets the same."""
    dataset.set_epoch(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
    sq, n = None, None
    for _, batch in zip(range(num_batches), loader):
        target, cond, mask = batch["target"].to(device), batch["condition"].to(device), batch["mask"].float().to(device)
        mean = regression_forward(reg_unet, target, cond)
        err = (target - mean.float()) ** 2 * mask
        sq = err.sum((0, 2, 3)) if sq is None else sq + err.sum((0, 2, 3))
        n = mask.sum((0, 2, 3)) if n is None else n + mask.sum((0, 2, 3))
    return [float(x) for x in (sq / n.clamp_min(1)).sqrt().cpu()]


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
class NoiseRNG:
    """A dedicated generator for diffusion noise and timesteps, saved in every checkpoint.

    The global torch RNG is also consumed by DataLoader iterators (created at different points in a
    fresh and a resumed run), so a resumed run only repeats an uninterrupted one with its own stream.
    Its state is a safetensors file per process, never a pickle: Accelerate's ``register_for_checkpointing``
    would unpickle it with ``weights_only=False``, so a shared checkpoint could run code on resume.
    """

    def __init__(self, seed: int, device):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @staticmethod
    def path(folder, process_index: int) -> Path:
        return Path(folder) / f"noise_rng_{process_index}.safetensors"

    def save(self, folder, process_index: int) -> None:
        from safetensors.torch import save_file

        save_file({"state": self.generator.get_state()}, str(self.path(folder, process_index)))

    def load(self, folder, process_index: int) -> None:
        from safetensors.torch import load_file

        path = self.path(folder, process_index)
        try:
            state = load_file(str(path))["state"]
            self.generator.set_state(state.cpu())
        except Exception as err:  # missing or corrupt: a resume without it would silently differ
            raise ValueError(f"Cannot restore the noise RNG from {path} ({err}); the checkpoint is incomplete.") from err


def check_checkpoint_readable(path: Path, process_index: int) -> None:
    """Fail (never skip) when a checkpoint's random states cannot be read safely: Accelerate would log it and go on,
    and the resumed run would silently stop repeating an uninterrupted one. Loaded with ``weights_only=True``: a
    pickle that carries code is refused here, not executed."""
    from accelerate.utils import load

    rng = path / f"random_states_{process_index}.pkl"
    try:
        load(rng)
    except Exception as err:
        raise ValueError(f"Checkpoint {path} has an unreadable or unsafe {rng.name} ({type(err).__name__}: {err}).") from err


def make_optimizer(params, lr: float, weight_decay: float, device) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel on CUDA (the benchmarks' bare loop uses the same call)."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def synchronize(device) -> None:
    """Wait for queued GPU work, so that wall-clock rates count what was computed, not what was queued."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-N`` folders, oldest first. Half-written ones (no marker) never count."""
    out = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None):
    """Write ``checkpoint-N`` atomically: save to a temporary folder, mark complete, then rename."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit is not None:
            for _, old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# validation through the real pipeline
# ----------------------------------------------------------------------------------------------
def validate(pipe, val, cfg, seed: int) -> dict:
    """RMSE of the ensemble mean, one member and the interpolated input against the truth on (a few)
    validation samples; ``val_rmse_lerp`` uses the model's own interpolation."""
    from dpdm_diffusers.data import regrid
    from dpdm_diffusers.grids import Grid

    low, truth, static = val
    variables = list(pipe.config.variables)
    gaps = any(bool(np.isnan(low[v].values).any()) for v in variables)
    out = pipe(
        low, static_fields=static, num_members=cfg.validation_members, nan_policy="mask" if gaps else "raise",
        num_inference_steps=cfg.validation_inference_steps, generator=torch.Generator().manual_seed(seed),
    )
    lerp = regrid(low[variables], Grid.from_xarray(truth), method=pipe.config.interpolation)

    def rmse(forecast) -> float:
        return float(np.sqrt(np.nanmean([((forecast[v].values - truth[v].values) ** 2) for v in variables])))

    scores = {"val_rmse_mean": rmse(out.mean), "val_rmse_lerp": rmse(lerp), "val_rmse_member0": rmse(out.members.isel(member=0))}
    scores["val_rmse_ratio"] = scores["val_rmse_mean"] / scores["val_rmse_lerp"] if scores["val_rmse_lerp"] > 0 else float("nan")
    return scores


# ----------------------------------------------------------------------------------------------
# model card
# ----------------------------------------------------------------------------------------------
def training_card(cfg, pipe, *, data_info, fields, global_step, num_processes, wall, validation, calibration,
                  stochastic_std, base=None) -> str:
    """The model card of a training run: lineage, data, procedure, architecture (read off the weights), scores."""
    from dpdm_diffusers import __version__
    from dpdm_diffusers.io import portable_path
    from dpdm_diffusers.model_card import base_model_reference, render_model_card
    from dpdm_diffusers.modeling import describe_unet

    base_id, base_text = base_model_reference(cfg.init_from, base) if cfg.init_from else (None, None)
    two_stage = pipe.regression_unet is not None
    summary = (f"Trained with `dpdm_diffusers.training.train_dpdm` (dpdm-diffusers {__version__}), objective `{cfg.objective}`"
               + (f", fine-tuned from {base_text}" if base_text else "")
               + (", two-stage: regression UNet mean + residual diffusion (stochastic_std "
                  + ", ".join(f"{x:.3f}" for x in stochastic_std) + ")" if two_stage else "") + ".")
    command = " ".join(str(portable_path(a)) if os.path.exists(a) else a for a in sys.argv)
    arch = [f"- {name}: {describe_unet(m)}" for name, m in (("unet", pipe.unet), ("regression_unet", pipe.regression_unet)) if m is not None]
    sections = {
        "Training data": "\n".join(f"- {k}: {portable_path(v)}" for k, v in data_info.items())
        + f"\n- high-res training grid: {fields.shape[0]} x {fields.shape[1]}, {fields.num_samples} training fields",
        "Training procedure": "\n".join([
            f"- steps: {global_step}, batch {cfg.train_batch_size} x {num_processes} processes "
            f"x {cfg.gradient_accumulation_steps} accumulation, patches {cfg.patch_size} px",
            *arch,
            f"- AdamW lr {cfg.learning_rate}, {cfg.lr_scheduler} schedule, EMA {cfg.use_ema} (decay {cfg.ema_decay})",
            f"- seed {cfg.seed}, mixed precision {cfg.mixed_precision}, wall time of this invocation {wall / 60:.1f} min",
            f"- command: `{command}`",
            "- config:\n\n```yaml\n" + yaml.safe_dump(portable_path(dataclasses.asdict(cfg)), sort_keys=False) + "```",
        ]),
        "Validation": "\n".join(f"- {k}: {v:.4f}" for k, v in validation.items()) or "no validation scores yet",
    }
    if calibration:
        sections["Spread calibration"] = (
            f"`stochastic_std` multiplied by {calibration['factor']:.3f}, the factor with "
            + ("the lowest fair CRPS" if calibration.get("target") == "crps" else "a spread-skill ratio closest to 1")
            + f" on the validation split ({calibration['num_members']} members): CRPS {calibration['crps_uncalibrated']:.4f} -> "
            f"{calibration['crps']:.4f}, spread-skill {calibration['ssr_uncalibrated']:.2f} -> {calibration['ssr']:.2f}.")
    return render_model_card(dict(pipe.config), title=cfg.model_card_title, base_model=base_id, base_text=base_text,
                             repo_id=cfg.hub_model_id, summary=summary, sections=sections, pipe=pipe,
                             eval_results=_card_scores(validation, calibration),
                             eval_dataset={"dataset_name": f"{', '.join(map(str, pipe.config.variables))} validation split",
                                           "dataset_type": "custom", "dataset_split": "validation"})


def _card_scores(validation: dict, calibration: dict | None) -> dict:
    """The validation scores a card's ``model-index`` shows, with names a reader of the Hub page understands."""
    names = {"val_rmse_mean": "RMSE ensemble mean", "val_rmse_member0": "RMSE one member", "val_rmse_lerp": "RMSE interpolation"}
    scores = {label: validation[k] for k, label in names.items() if k in validation}
    if calibration:
        scores["CRPS ensemble"] = calibration["crps"]
        scores["SSR spread-skill"] = calibration["ssr"]
    return scores


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> Path:
    """Train, or fine-tune: a two-stage ``--init_from`` model is fine-tuned as one (see :func:`finetune_two_stage`)."""
    cfg, kind = resolve_options(parse_args(argv))
    if kind == "two-stage" and cfg.objective == "diffusion" and not cfg.regression_model:
        return finetune_two_stage(cfg)
    return train(cfg, kind)


def finetune_two_stage(cfg: TrainingConfig) -> Path:
    """Fine-tune both stages of a two-stage model on new data, in one run that resumes like any other.

    1. Stage 1: the base's regression UNet (the mean, which carries most of the skill) is fine-tuned with the
       regression objective for ``regression_steps`` steps into ``output_dir/stage1-regression``.
    2. Stage 2: the base's diffusion UNet is fine-tuned on the residual of that *new* regression, with
       ``stochastic_std`` re-estimated from it, then the spread is calibrated on the validation split.
    A finished stage 1 (its folder holds ``model_index.json``) is not trained again on rerun.
    """
    from accelerate import PartialState

    out = Path(cfg.output_dir)
    stage1 = out / "stage1-regression"
    resume = cfg.resume_from_checkpoint
    in_stage1 = resume not in (None, "latest") and Path(resume).resolve().parent == stage1.resolve()
    if not (stage1 / "model_index.json").exists():
        cfg1 = dataclasses.replace(
            cfg, objective="regression", output_dir=str(stage1), max_train_steps=cfg.regression_steps or cfg.max_train_steps,
            calibrate_spread=False, regression_steps=None, push_to_hub=False,
            resume_from_checkpoint=resume if (in_stage1 or resume == "latest") else None,
            model_card_title=f"{cfg.model_card_title} (stage 1: regression mean)",
        )
        train(cfg1, "two-stage")
        PartialState().wait_for_everyone()
        if not (stage1 / "model_index.json").exists():  # stopped early (--stop_after_steps): resume later
            return stage1
    else:
        logger.info("stage 1 (regression) is complete in %s; fine-tuning stage 2", stage1)
    cfg2 = dataclasses.replace(
        cfg, regression_model=str(stage1), recompute_statistics=False, regression_steps=None,
        resume_from_checkpoint=None if in_stage1 else resume,
    )
    return train(cfg2, "two-stage")


def train(cfg: TrainingConfig, base_kind: str | None = None) -> Path:
    """One training run (one UNet) with an already resolved config."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from dpdm_diffusers import DownscalingPipeline, __version__
    from dpdm_diffusers.model_card import render_model_card
    from dpdm_diffusers.modeling import build_unet, default_sampler, default_scheduler
    from dpdm_diffusers.device_patches import fits_on_device
    from dpdm_diffusers.samples import RandomPatchDataset, normalize_fields
    from dpdm_diffusers.transforms import Normalizer
    from dpdm_diffusers.user_data import validation_inputs

    t_start = time.time()
    output_dir = Path(cfg.output_dir)
    log_with = None
    if cfg.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            log_with = None
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info("state: %s", accelerator.state)
    set_seed(cfg.seed, device_specific=True)  # different crops on every process
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for partial in output_dir.glob(".checkpoint-*.partial"):  # left by a killed run
            shutil.rmtree(partial, ignore_errors=True)
        (output_dir / "training_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    # 1. Base model (fine-tuning) and data
    base = None
    if cfg.init_from:
        base = DownscalingPipeline.from_pretrained(cfg.init_from)
        if cfg.objective == "regression" and base.regression_unet is not None:
            base = base.regression_pipeline()  # fine-tune a two-stage model's first stage (its mean)
    reg = load_regression_model(cfg.regression_model, base) if cfg.regression_model else None
    reg_unet = reg.unet if reg is not None else (base.regression_unet if base is not None else None)
    stats_from = reg if reg is not None else base  # the diffusion stage lives in the regression model's space
    units = dict(zip(stats_from.config.variables, stats_from.config.units)) if stats_from is not None else None
    region = load_pairs(cfg, units)
    pairs, static, train_sel = region.pairs, region.static, region.train
    stats = build_statistics(cfg, pairs, static, train_sel, None if stats_from is None else dict(stats_from.config),
                             exclude_box=region.validation_box)
    normalizer = Normalizer.from_config({**stats, "prediction": cfg.prediction})
    variables = stats["variables"]
    fields = normalize_fields(
        pairs.high_res[variables].sel(**train_sel), pairs.lerp(cfg.interpolation)[variables].sel(**train_sel),
        normalizer, static,
    )
    if region.validation_box is not None:  # the validation box is scored, never learnt from
        ys, xs = region.validation_box
        fields.target[..., ys, xs] = np.nan
        logger.info("validation box: %d x %d high-res points left out of the training loss", ys.stop - ys.start, xs.stop - xs.start)
    if min(fields.shape) < cfg.patch_size:
        logger.info("the %d x %d domain is smaller than the %d px patch: padded as at inference, scored on the real "
                    "domain only", *fields.shape, cfg.patch_size)
    dataset = RandomPatchDataset(fields, cfg.patch_size, seed=cfg.seed)
    val = validation_inputs(region, cfg.validation_max_samples)
    data_info = region.describe
    logger.info("training on %d fields of %s, %d patches per epoch", fields.num_samples, fields.shape, len(dataset))
    stochastic_std = None
    if reg_unet is not None:
        reg_unet.requires_grad_(False).eval().to(accelerator.device)
        if base is not None and base.regression_unet is not None and not cfg.regression_model and not cfg.recompute_statistics:
            stochastic_std = list(base.config.stochastic_std)
        else:
            stochastic_std = regression_residual_rms(
                reg_unet, dataset, cfg.stochastic_std_batches, cfg.train_batch_size, accelerator.device)
        logger.info("two-stage model: the diffusion UNet learns the regression residual / %s", stochastic_std)
        stochastic_scale = torch.tensor(stochastic_std, device=accelerator.device).view(1, -1, 1, 1)
        if cfg.spread_factor != 1.0:  # the sampling scale only: the UNet still learns residuals of unit scale
            stochastic_std = [s * cfg.spread_factor for s in stochastic_std]
            logger.info("spread factor %s: members are sampled with stochastic_std %s", cfg.spread_factor, stochastic_std)

    # 2. Model, EMA, optimiser
    if base is not None:
        unet = base.unet
    else:
        unet = build_unet(len(variables), len(stats["static_channels"]), cfg.patch_size, cfg.unet_preset)
    unet.train()
    noise_scheduler = default_scheduler()
    ema = None
    if cfg.use_ema:
        # foreach: one fused update of all parameters instead of a kernel per tensor (hundreds of launches a step)
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup, inv_gamma=1.0,
                       power=3 / 4, foreach=True, model_cls=UNet2DModel, model_config=unet.config)

    def save_model_hook(models, weights, out):
        noise_rng.save(out, accelerator.process_index)  # every process: its own noise stream
        if accelerator.is_main_process:
            if ema is not None:
                ema.save_pretrained(os.path.join(out, "unet_ema"))
            for m in models:
                accelerator.unwrap_model(m).save_pretrained(os.path.join(out, "unet"))
                weights.pop()

    def load_model_hook(models, inp):
        noise_rng.load(inp, accelerator.process_index)
        if ema is not None:
            from diffusers.utils import logging as dlogging

            level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # EMA's own config keys are not UNet config: diffusers warns
            try:
                loaded = EMAModel.from_pretrained(os.path.join(inp, "unet_ema"), UNet2DModel)
            finally:
                dlogging.set_verbosity(level)
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
        for _ in range(len(models)):
            m = models.pop()
            loaded = UNet2DModel.from_pretrained(inp, subfolder="unet")
            m.register_to_config(**loaded.config)
            m.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    optimizer = make_optimizer(unet.parameters(), cfg.learning_rate, cfg.adam_weight_decay, accelerator.device)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train_batch_size, shuffle=False, num_workers=cfg.dataloader_num_workers,
        drop_last=True,
    )
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    noise_rng = NoiseRNG(cfg.seed * 1000 + accelerator.process_index, accelerator.device)  # saved by the hooks above
    on_device = cfg.patches_on_device
    if on_device is None:
        on_device = fits_on_device(dataset.fields, accelerator.device)
    sampler = None
    if on_device:
        from dpdm_diffusers.device_patches import DevicePatchSampler

        sampler = DevicePatchSampler(dataset, cfg.train_batch_size, accelerator.device, accelerator.process_index)
    logger.info("patches cut %s", f"on {accelerator.device} (fields held there)" if sampler else
                f"by a DataLoader ({cfg.dataloader_num_workers} workers)")
    steps_per_epoch = max(1, math.ceil(len(dataloader) / cfg.gradient_accumulation_steps))

    # 3. Resume
    global_step = 0
    if cfg.resume_from_checkpoint:
        if cfg.resume_from_checkpoint == "latest":
            candidates = [p for _, p in reversed(list_checkpoints(output_dir))]  # newest first
        else:
            path = Path(cfg.resume_from_checkpoint)
            if not (path / COMPLETE_MARKER).exists():
                raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}).")
            candidates = [path]
        if not candidates:
            logger.info("no complete checkpoint in %s: starting a new run", output_dir)
        for k, path in enumerate(candidates):
            try:
                check_checkpoint_readable(path, accelerator.process_index)
                accelerator.load_state(str(path))
            except Exception as err:
                if k + 1 == len(candidates) or cfg.resume_from_checkpoint != "latest":
                    raise ValueError(f"Cannot resume from {path}: {err}") from err
                logger.warning("checkpoint %s is unreadable (%s); falling back to %s", path, err, candidates[k + 1])
                continue
            global_step = int(path.name.split("-")[1])
            logger.info("resumed from %s at step %d", path, global_step)
            break
    if accelerator.is_main_process and log_with:
        accelerator.init_trackers("dpdm", config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})

    def pipeline_from(model) -> DownscalingPipeline:
        # DPM-Solver++ on the training schedule, never starting at t = 999 (see modeling.default_sampler)
        pipe = DownscalingPipeline(
            unet=model, scheduler=default_sampler(), **stats, scale_factor=cfg.scale_factor,
            patch_size=cfg.patch_size, prediction=cfg.prediction, interpolation=cfg.interpolation,
            objective=cfg.objective, regression_unet=reg_unet, stochastic_std=stochastic_std,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run_validation(step) -> dict:
        if val is None:
            return {}
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        model.eval()
        try:
            metrics = validate(pipeline_from(model), val, cfg, seed=cfg.seed)
        finally:
            model.train()
            if ema is not None:
                ema.restore(model.parameters())
        logger.info("step %d validation: %s", step, metrics)
        accelerator.log(metrics, step=step)
        return metrics

    # 4. Train
    stop_at = cfg.max_train_steps if cfg.stop_after_steps is None else min(cfg.max_train_steps, global_step + cfg.stop_after_steps)
    progress = tqdm(range(cfg.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process, desc="train")
    accum = cfg.gradient_accumulation_steps

    def batches():
        if sampler is not None:  # crops of micro-step m are a function of (seed, process, m): resumable as is
            micro = global_step * accum
            while True:
                yield sampler.batch(micro)
                micro += 1
        while True:
            dataset.set_epoch(global_step // steps_per_epoch)  # fresh crops each epoch; crops depend on (seed, epoch, i)
            skip = (global_step % steps_per_epoch) * accum
            yield from accelerator.skip_first_batches(dataloader, skip) if skip else dataloader

    samples_seen, last_val, first_crops = 0, {}, None
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
    # steady-state rate: from the 10th step on (after cuDNN's autotuning and the allocator's first growth)
    start_step, warmup_steps, steady_from = global_step, 10, None
    t_loop = t_steady = time.time()
    for batch in batches() if global_step < stop_at else ():
        with accelerator.accumulate(unet):
            target, cond, mask = batch["target"], batch["condition"], batch["mask"].float()
            if reg_unet is not None:  # two-stage: learn what the frozen regression mean misses
                with torch.no_grad():
                    mean = regression_forward(reg_unet, target, cond)
                target = (target - mean.to(target.dtype)) / stochastic_scale
            if cfg.objective == "diffusion":
                gen = noise_rng.generator
                noise = torch.randn(target.shape, generator=gen, device=gen.device).to(target.device, target.dtype)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (target.shape[0],), generator=gen,
                                  device=gen.device).to(target.device)
                noisy = noise_scheduler.add_noise(target, noise, t)
                pred = unet(torch.cat([noisy, cond], dim=1), t).sample
                goal = noise
            else:  # deterministic baseline: zero noise, t = 0, predict the target itself
                pred = regression_forward(unet, target, cond)
                goal = target
            # L2 over valid (unmasked) points only
            loss = (F.mse_loss(pred.float(), goal.float(), reduction="none") * mask).sum() / mask.sum().clamp_min(1)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        samples_seen += target.shape[0] * accelerator.num_processes
        loss_sum += loss.detach()
        loss_count += 1
        if first_crops is None:  # which crops each process drew first: distinct data per process
            crops = torch.stack([torch.as_tensor(batch[k]) for k in ("sample", "y", "x")], dim=1).to(accelerator.device)
            first_crops = accelerator.gather(crops).view(accelerator.num_processes, -1, 3).tolist()
        if not accelerator.sync_gradients:
            continue
        if ema is not None:
            ema.step(unet.parameters())
        global_step += 1
        progress.update(1)
        if global_step % cfg.logging_steps == 0 or global_step >= stop_at:
            # reading the loss waits for the device, so it is read every logging_steps steps, not every step
            logs = {"loss": float(loss_sum) / loss_count, "lr": lr_scheduler.get_last_lr()[0]}
            loss_sum.zero_()
            loss_count = 0
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
        if steady_from is None and global_step - start_step == warmup_steps:
            synchronize(accelerator.device)
            t_steady, steady_from = time.time(), samples_seen
        if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit)
        if cfg.validation_steps and global_step % cfg.validation_steps == 0 and accelerator.is_main_process:
            last_val = run_validation(global_step)
        if global_step >= stop_at:
            break
    synchronize(accelerator.device)
    throughput = samples_seen / max(time.time() - t_loop, 1e-9)
    steady_throughput = (throughput if steady_from is None or samples_seen == steady_from
                         else (samples_seen - steady_from) / max(time.time() - t_steady, 1e-9))
    progress.close()

    # 5. Save the final pipeline (EMA weights) with its model card
    accelerator.wait_for_everyone()
    if global_step < cfg.max_train_steps:
        if not (cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0):
            save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit)
        logger.info("stopped at step %d of %d; continue with --resume_from_checkpoint latest", global_step, cfg.max_train_steps)
        accelerator.end_training()
        return output_dir
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(model.parameters())
        pipe = pipeline_from(model)
        wall = time.time() - t_start

        def card(validation: dict, calibration: dict | None) -> str:
            return training_card(cfg, pipe, data_info=data_info, fields=fields, global_step=global_step,
                                 num_processes=accelerator.num_processes, wall=wall, validation=validation,
                                 calibration=calibration, stochastic_std=stochastic_std, base=base)

        # the trained model is saved before anything that could still fail (validation, calibration, upload)
        pipe.model_card = card({}, None)
        pipe.save_pretrained(output_dir)
        calibration = None
        if not last_val:
            last_val = run_validation(global_step)
        calibrate = cfg.calibrate_spread if cfg.calibrate_spread is not None else region.has_validation
        if calibrate and reg_unet is not None and region.has_validation:
            from dpdm_diffusers.calibration import calibrate_spread

            low, truth, val_static = validation_inputs(region, cfg.calibration_max_samples)
            calibration = calibrate_spread(pipe, low, truth, static_fields=val_static, num_members=cfg.calibration_members,
                                           num_inference_steps=cfg.validation_inference_steps, seed=cfg.seed,
                                           target=cfg.calibration_target)
            stochastic_std = calibration["stochastic_std"]
            pipe.register_to_config(stochastic_std=stochastic_std)
            logger.info("spread calibration on the validation split: factor %.3f, CRPS %.4f -> %.4f, SSR %.2f -> %.2f",
                        calibration["factor"], calibration["crps_uncalibrated"], calibration["crps"],
                        calibration["ssr_uncalibrated"], calibration["ssr"])
        pipe.model_card = card(last_val, calibration)
        pipe.save_pretrained(output_dir)
        (output_dir / "training_summary.json").write_text(json.dumps(
            {"global_step": global_step, "train_samples_per_s": throughput,
             "steady_train_samples_per_s": steady_throughput, "wall_time_s": time.time() - t_start,
             "num_processes": accelerator.num_processes, "first_crops_per_process": first_crops,
             "stochastic_std": stochastic_std,
             "spread_calibration": {k: v for k, v in calibration.items() if k != "curve"} if calibration else None,
             **last_val}, indent=2))
        if cfg.push_to_hub:
            pipe.push_to_hub(cfg.hub_model_id)
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    main()
