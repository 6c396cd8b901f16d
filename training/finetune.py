# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""Fine-tune a model on your region, or train one from scratch on your files, in one call: what ``dpdm finetune``
and ``dpdm train`` run.

    from dpdm_diffusers.training.finetune import finetune

    finetune(["era5/*.nc"], output_dir="runs/my-region", model="models/dpdm-glosea4-ts-x4",
             variable=["t2m=surface_temperature"], train_time="1979,2015", validation_time="2016,2020")

    train(["tigge.nc"], output_dir="runs/five", variables=["2t", "10u", "10v", "sp", "tp"], units=["tp=mm"],
          regular_grid=True, static=["topography=tigge.nc", "land_sea_mask=tigge.nc"])

The options map onto one :class:`~dpdm_diffusers.training.config.TrainingConfig`; the equivalent training-script
command is ``render_command(finetune_config(...))`` (or ``train_config``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from .config import TrainingConfig, describe_errors, load_pipeline_config, load_yaml_options, model_kind

__all__ = ["base_objective", "finetune", "finetune_config", "train", "train_config"]

logger = logging.getLogger("dpdm_diffusers.training")


def _pair(value, option: str) -> list[str]:
    """``"a,b"`` (the CLI's form) or a pair -> ``[a, b]``; nothing -> ``[]``."""
    if value is None or value == "" or (not isinstance(value, str) and len(value) == 0):
        return []
    parts = [x.strip() for x in value.split(",")] if isinstance(value, str) else [str(x).strip() for x in value]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{option} is written as two comma-separated values (e.g. 1860,2000), got {value!r}")
    return parts


def base_objective(model: str) -> str:
    """The objective that fine-tunes ``model`` as it is: ``"regression"`` for a regression model, else
    ``"diffusion"`` (a two-stage model is fine-tuned as one, both stages).

    Raises:
        ValueError: The model's config cannot be read.
    """
    return "regression" if model_kind(load_pipeline_config(model)) == "regression" else "diffusion"


def finetune_config(
    high_res: Sequence[str], *, output_dir: str | Path, model: str | None, variable: Sequence[str] = (),
    static: Sequence[str] = (), static_map: Sequence[str] = (), low_res: Sequence[str] = (),
    train_time=None, validation_time=None, lat_box=None, lon_box=None, validation_lat_box=None,
    validation_lon_box=None, steps: int = 500, regression_steps: int | None = None, batch_size: int = 16,
    learning_rate: float = 1e-4, seed: int = 0, regular_grid: bool = False, config: str | Path | None = None,
    resume: bool = False, objective: str = "diffusion", **options,
) -> TrainingConfig:
    """The training config of fine-tuning ``model`` on your files (nothing is read but ``config``).

    Args:
        high_res: Your high-res files: netCDF or zarr paths, globs allowed.
        output_dir: Folder of the fine-tuned model (checkpoints too).
        model: Base model: pipeline folder or Hub id; ``None`` trains from scratch (:func:`train_config`).
        variable: ``"yours=model's"`` variable names, e.g. ``["air_temperature=surface_temperature"]``.
        static: ``"channel=path"`` static field files, e.g. ``["topography=orog.nc"]`` (default: packaged data).
        static_map: ``"name in a static file=channel"``, e.g. ``["orog=topography"]``.
        low_res: A real low-res source (default: block means of the high-res).
        train_time, validation_time: ``"start,end"`` (inclusive) or a pair.
        lat_box, lon_box: The region, ``"south,north"`` / ``"west,east"`` or pairs.
        validation_lat_box, validation_lon_box: A spatial validation box (for few time steps).
        steps: Training steps (of each stage of a two-stage model).
        regression_steps: Steps of the regression stage of a two-stage model (default: ``steps``).
        batch_size: Patches per step.
        learning_rate: AdamW learning rate.
        seed: Seed of the run.
        regular_grid: Put near-regular (e.g. Gaussian) latitudes on a regular grid, conservatively.
        config: A YAML file with any other training option; the arguments above take precedence.
        resume: Continue an interrupted run in ``output_dir``.
        objective: ``"regression"`` for a regression base model (:func:`base_objective` tells which).
        **options: Any other :class:`TrainingConfig` field, e.g. ``calibration_target="crps"``.

    Returns:
        The config, checked by pydantic (not yet against the base model: see ``resolve_options``).

    Raises:
        ValueError: A malformed option (a name mapping without ``=``, a range that is not a pair, a wrong type).
    """
    from dpdm_diffusers.data import parse_mapping

    values = dict(load_yaml_options(config)) if config else {}
    values.update(
        init_from=model, output_dir=str(output_dir), high_res=[str(p) for p in high_res], max_train_steps=steps,
        train_batch_size=batch_size, learning_rate=learning_rate, seed=seed, report_to="none", objective=objective,
    )
    if regression_steps is not None:
        values["regression_steps"] = regression_steps
    for key, items in (("variable_map", variable), ("static_map", static_map), ("static_files", static)):
        if items:
            values[key] = parse_mapping(list(items))
    if low_res:
        values["low_res"] = [str(p) for p in low_res]
    ranges = {"train_time": train_time, "validation_time": validation_time, "lat_box": lat_box, "lon_box": lon_box,
              "validation_lat_box": validation_lat_box, "validation_lon_box": validation_lon_box}
    for key, value in ranges.items():
        pair = _pair(value, f"{key} (--{key.replace('_', '-')})")
        if pair:
            values[key] = pair
    if regular_grid:
        values["regular_grid"] = True
    if resume:
        values["resume_from_checkpoint"] = "latest"
    values.update(options)
    try:
        return TrainingConfig(**values)
    except ValidationError as err:  # one line naming the options, for the command line's message
        raise ValueError(f"invalid options: {describe_errors(err)}") from None


def finetune(high_res: Sequence[str], *, output_dir: str | Path, model: str, **options) -> Path:
    """Fine-tune ``model`` on your files: a two-stage model gets both stages fine-tuned, then its spread
    calibrated on the validation split; a regression or a plain diffusion model is fine-tuned as one.

    Args:
        high_res, output_dir, model, **options: As for :func:`finetune_config`; ``objective`` defaults to the
            base model's (:func:`base_objective`).

    Returns:
        The folder of the fine-tuned model.
    """
    from .config import render_command
    from .train_dpdm import run

    options.setdefault("objective", base_objective(model))
    cfg = finetune_config(high_res, output_dir=output_dir, model=model, **options)
    logger.info("fine-tuning: %s", render_command(cfg))
    return run(cfg)


def train_config(high_res: Sequence[str], *, output_dir: str | Path, variables: Sequence[str] = (),
                 units: Sequence[str] = (), objective: str = "two-stage", unet_preset: str | None = None,
                 patch_size: int | None = None, scale_factor: int | None = None,
                 interpolation: str | None = None, transforms: Sequence[str] = (),
                 dry_threshold: Sequence[str] = (), **options) -> TrainingConfig:
    """The training config of a new model on your files, two-stage by default (both stages, then the spread).

    Args:
        high_res, output_dir: As for :func:`finetune_config` (and every option of it but ``model``).
        variables: Your variables to downscale (default: every variable of the files).
        units: ``"variable=units"`` for files without them, or to convert to (e.g. ``["tp=mm"]`` for GRIB's
            ``kg m**-2``).
        objective: ``"two-stage"`` (regression mean + residual diffusion), ``"diffusion"`` or ``"regression"``.
        unet_preset, patch_size, scale_factor: The model's shape (defaults: ``fast``... see ``TrainingConfig``).
        interpolation: ``bilinear``, ``bicubic``, one per variable (``"bicubic,bicubic,bilinear"``) or the default
            ``auto`` (bicubic).
        transforms: One per variable, e.g. ``["identity", "sqrt"]`` (default: log1p for precipitation).
        dry_threshold: ``"variable=amount"`` in its units (default 0.1 mm for precipitation).
    """
    from dpdm_diffusers.data import parse_mapping

    if objective not in ("two-stage", "diffusion", "regression"):
        raise ValueError(f"objective must be two-stage, diffusion or regression, got {objective!r}")
    extra = {k: v for k, v in dict(unet_preset=unet_preset, patch_size=patch_size, scale_factor=scale_factor,
                                   interpolation=interpolation).items() if v is not None}
    if variables:
        extra["variables"] = list(variables)
    if transforms:
        extra["transforms"] = list(transforms)
    for key, items in (("units", units), ("dry_threshold", dry_threshold)):
        if items:
            extra[key] = parse_mapping(list(items))
    if "dry_threshold" in extra:
        extra["dry_threshold"] = {k: float(v) for k, v in extra["dry_threshold"].items()}
    return finetune_config(high_res, output_dir=output_dir, model=None, two_stage=objective == "two-stage",
                           objective="regression" if objective == "regression" else "diffusion", **extra,
                           **options)


def train(high_res: Sequence[str], *, output_dir: str | Path, **options) -> Path:
    """Train a new model on your files (:func:`train_config`'s options) and return its folder."""
    from .config import render_command
    from .train_dpdm import run

    cfg = train_config(high_res, output_dir=output_dir, **options)
    logger.info("training: %s", render_command(cfg))
    return run(cfg)
