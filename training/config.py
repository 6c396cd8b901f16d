# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""Training options: one :class:`TrainingConfig`, read from YAML and the command line, checked before anything runs.

A config is built in one of three ways, all validated by pydantic the same way:

* ``parse_args(argv)``: a YAML file (``--config``) and command-line overrides (the training script);
* ``TrainingConfig(**options)``: directly, from Python (``dpdm finetune`` does this);
* ``parse_args(to_argv(cfg))`` gives back ``cfg``: :func:`render_command` prints the command that reproduces a
  config built in Python.

:func:`resolve_options` then fills the model settings from the base model (or the defaults) and refuses every
inconsistent combination at start-up, never at the first validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from dataclasses import field
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

__all__ = [
    "MODEL_DEFAULTS",
    "TrainingConfig",
    "describe_errors",
    "glosea4_splits",
    "load_pipeline_config",
    "load_yaml_options",
    "model_kind",
    "parse_args",
    "render_command",
    "resolve_options",
    "to_argv",
]

SCRIPT = "python -m dpdm_diffusers.training.train_dpdm"

# Sizes, counts and rates are validated by pydantic (YAML's "1e-4" is a string, "false" is truthy in Python):
# a wrong type or an impossible value is refused with the option named, before anything runs.
positive = Annotated[int, Field(gt=0)]
non_negative = Annotated[int, Field(ge=0)]
rate = Annotated[float, Field(ge=0)]


@dataclass(config=ConfigDict(extra="forbid"))
class TrainingConfig:
    """Every option of a training run; the YAML keys and ``--flags`` of the training script have these names."""

    # data ---------------------------------------------------------------------------------------
    dataset: Literal["files", "glosea4-ts-x4"] = "files"  # "files" or "glosea4-ts-x4"
    high_res: list[str] = field(default_factory=list)  # netCDF/zarr paths or globs (dataset=files)
    low_res: list[str] = field(default_factory=list)  # optional real low-res source; default: block-mean
    # default: every variable of the files (or the base model's)
    variables: list[str] = field(default_factory=list)
    # your names -> the model's, e.g. {air_temperature: surface_temperature}
    variable_map: dict = field(default_factory=dict)
    # units per variable: declared for a file whose variable has none, else converted to (e.g. {tp: mm} for GRIB's
    # kg m**-2); fine-tuning converts to the base model's units in any case
    units: dict = field(default_factory=dict)
    transforms: list[str] = field(default_factory=list)  # default: log1p for precipitation, else identity
    # per variable, output below it is set to 0 (in the variable's units); default 0.1 mm (or its equivalent) for
    # precipitation-like variables in depth or mass-per-area units, else 0
    dry_threshold: dict = field(default_factory=dict)
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
    # one for all variables or one per variable; default: the base model's, else "auto" (bicubic: measured best for
    # all five TIGGE variables, precipitation too, whose rare negative overshoot the transform clips)
    interpolation: Literal["bilinear", "bicubic", "auto"] | list[Literal["bilinear", "bicubic"]] | None = None
    # or "regression" (deterministic baseline, same UNet)
    objective: Literal["diffusion", "regression"] = "diffusion"
    # two-stage (CorrDiff) model: a trained regression pipeline whose prediction is the mean; the diffusion
    # UNet learns what it misses, divided by its RMS (stochastic_std, from `stochastic_std_batches` batches)
    regression_model: str | None = None
    stochastic_std_batches: positive = 32
    # multiplies the stochastic_std the members are sampled with (not the scale the UNet learns), e.g. a factor
    # calibrated on held-out data by a run of the same recipe (for a refit that keeps no validation split)
    spread_factor: Annotated[float, Field(gt=0)] = 1.0
    # after training, scale stochastic_std on the validation split (dpdm_diffusers.calibration) to
    # `calibration_target`; default (None): on for two-stage models whenever there is a validation split
    calibrate_spread: bool | None = None
    # "ssr": spread-skill 1 on validation; "crps": lowest fair CRPS (narrower)
    calibration_target: Literal["ssr", "crps"] = "ssr"
    calibration_members: Annotated[int, Field(ge=2)] = 8
    calibration_max_samples: positive = 16
    # fine-tuning: a pretrained pipeline folder or Hub id. A two-stage base is fine-tuned as one: stage 1 (its
    # regression UNet, `regression_steps` steps) in output_dir/stage1-regression, then stage 2 (its diffusion
    # UNet on the new regression) with stochastic_std re-estimated and the spread calibrated on the validation split
    init_from: str | None = None
    # train a two-stage model from scratch in one run: stage 1 (regression, `regression_steps` steps) in
    # output_dir/stage1-regression, then stage 2 on its residual, then the spread calibration (as fine-tuning does)
    two_stage: bool = False
    regression_steps: positive | None = None  # two-stage runs: steps of stage 1 (default: max_train_steps)
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

    @field_validator("interpolation", mode="before")
    @classmethod
    def _split_interpolation(cls, value):  # the command line's "bicubic,bilinear" is one per variable
        if isinstance(value, str) and "," in value:
            return [v.strip() for v in value.split(",") if v.strip()]
        return value


# ----------------------------------------------------------------------------------------------
# YAML + command line <-> TrainingConfig
# ----------------------------------------------------------------------------------------------
def _parse_value(raw: str, annotation: str):
    """One command-line string: lists and maps are split here; scalars are left to pydantic, which converts
    "4", "1e-4" or "false" and refuses what does not fit the option's type."""
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


def load_yaml_options(path) -> dict:
    """The options of a YAML config file.

    Args:
        path: The YAML file; its keys are :class:`TrainingConfig` field names.

    Returns:
        The options as read (types are checked when a :class:`TrainingConfig` is built from them).

    Raises:
        ValueError: The file names an option that does not exist.
    """
    with open(path) as fh:
        loaded = yaml.safe_load(fh) or {}
    unknown = sorted(set(loaded) - {f.name for f in dataclasses.fields(TrainingConfig)})
    if unknown:
        raise ValueError(f"unknown option(s) in {path}: {unknown}")
    return loaded


def describe_errors(err: ValidationError) -> str:
    """A pydantic error as one line that names each offending option the way the command line spells it."""
    return "; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in err.errors())


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The training script's parser: ``--config`` and one ``--<field>`` per :class:`TrainingConfig` field."""
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML file with any of the options below.")
    for f in dataclasses.fields(TrainingConfig):
        parser.add_argument(f"--{f.name}", type=str, default=None, help=f"{f.type} (default from config/{f.name})")
    return parser


def parse_args(argv=None, description: str | None = None) -> TrainingConfig:
    """Read a YAML config first, then command-line overrides for any field.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``), e.g. ``["--config", "x.yaml", "--seed", "1"]``.
        description: The ``--help`` text (the training script passes its own docstring).

    Returns:
        The validated config. Wrong options end the program with argparse's usage message (exit status 2).
    """
    parser = build_parser(description)
    fields = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        try:
            values.update(load_yaml_options(args.config))
        except ValueError as err:
            parser.error(str(err))
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
        parser.error(f"invalid options: {describe_errors(err)}")


def _render_value(name: str, value) -> str:
    """The command-line text :func:`_parse_value` reads back as ``value``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
        if any("," in v for v in items):  # lists are split on commas: such an item cannot be written
            raise ValueError(f"--{name}: {items} has an item with a comma, which no command line can pass")
        return ",".join(items)
    return str(value)


def to_argv(cfg: TrainingConfig) -> list[str]:
    """The training-script arguments that rebuild ``cfg``: only the options that differ from the defaults.

    Args:
        cfg: A config (before :func:`resolve_options`, whose filled-in model settings would be written out too).

    Returns:
        Arguments such that ``parse_args(to_argv(cfg)) == cfg``.
    """
    defaults = TrainingConfig()
    argv = []
    for f in dataclasses.fields(TrainingConfig):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        text = _render_value(f.name, value)
        # "=" form: a southern latitude ("-20,-10") would be read as a flag, an empty list as a missing value
        argv += [f"--{f.name}={text}"] if text == "" or text.startswith("-") else [f"--{f.name}", text]
    return argv


def render_command(cfg: TrainingConfig, launcher: str = SCRIPT) -> str:
    """The shell command that runs ``cfg`` with the training script (``launcher`` could be ``accelerate launch -m
    dpdm_diffusers.training.train_dpdm``)."""
    return " ".join([launcher, *(shlex.quote(a) for a in to_argv(cfg))])


# ----------------------------------------------------------------------------------------------
# start-up checks: every inconsistent combination is refused here, never at the first validation
# ----------------------------------------------------------------------------------------------
MODEL_DEFAULTS = {"scale_factor": 4, "patch_size": 64, "prediction": "residual", "interpolation": "auto",
                  "static_channels": ["topography", "land_sea_mask"], "unet_preset": "small"}


def model_kind(config: dict) -> str:
    """``"two-stage"``, ``"diffusion"`` or ``"regression"`` from a pipeline's ``model_index.json``."""
    reg = config.get("regression_unet")
    if isinstance(reg, (list, tuple)) and reg and reg[0] is not None:
        return "two-stage"
    return "regression" if config.get("objective") == "regression" else "diffusion"


def load_pipeline_config(path: str) -> dict:
    """A pipeline's ``model_index.json`` as a dict, without loading any weights.

    Args:
        path: A pipeline folder or Hub id.

    Raises:
        ValueError: The config cannot be read (missing folder, no ``model_index.json``, offline Hub id...).
    """
    from dpdm_diffusers import DownscalingPipeline

    try:
        return dict(DownscalingPipeline.load_config(path))
    except Exception as err:
        raise ValueError(f"Cannot read the pipeline config of {path!r}: {err}") from err


def resolve_options(cfg: TrainingConfig) -> tuple[TrainingConfig, str | None]:
    """Fill model settings from the base model (or the defaults) and refuse what cannot work together.

    Args:
        cfg: The config as parsed; it is updated in place.

    Returns:
        The resolved config and the base model's kind (``None`` when training from scratch).

    Raises:
        SystemExit: With every inconsistent option listed, before anything is written.
    """
    base = load_pipeline_config(cfg.init_from) if cfg.init_from else None
    reg = load_pipeline_config(cfg.regression_model) if cfg.regression_model else None
    kind = model_kind(base) if base is not None else None
    problems = []
    if cfg.objective not in ("diffusion", "regression"):
        problems.append(f"--objective must be 'diffusion' or 'regression', got {cfg.objective!r}")
    if reg is not None and model_kind(reg) != "regression":
        problems.append(f"--regression_model {cfg.regression_model} is a {model_kind(reg)} model; it must be "
                        "trained with --objective regression")
    if kind == "diffusion" and cfg.objective == "regression":
        problems.append(f"--init_from {cfg.init_from} is a diffusion model and has no regression UNet to fine-tune "
                        "with --objective regression; train a regression model from scratch (no --init_from) instead")
    if kind == "regression" and cfg.objective == "diffusion" and not cfg.regression_model:
        problems.append(f"--init_from {cfg.init_from} is a regression model: fine-tune it with --objective "
                        f"regression, or train a two-stage diffusion model on it with --regression_model "
                        f"{cfg.init_from}")
    if cfg.init_from and cfg.unet_preset and base is not None:
        from diffusers import UNet2DModel

        from dpdm_diffusers.modeling import preset_of

        base_preset = preset_of(UNet2DModel.load_config(cfg.init_from, subfolder="unet"))
        if base_preset != cfg.unet_preset:
            problems.append(f"--unet_preset {cfg.unet_preset} differs from the base model's UNet "
                            f"({base_preset or 'custom'}); fine-tuning keeps the base model's architecture "
                            "(leave --unet_preset out)")
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
            if theirs is None:
                setattr(cfg, key, default)
            else:
                setattr(cfg, key, list(theirs) if isinstance(theirs, (list, tuple)) else theirs)
    if cfg.unet_preset is None:
        cfg.unet_preset = MODEL_DEFAULTS["unet_preset"]
    if cfg.patch_size is not None and cfg.patch_size <= 0:
        problems.append(f"--patch_size must be positive, got {cfg.patch_size}")
    if cfg.regression_model and cfg.objective != "diffusion":
        problems.append("--regression_model is the mean of a two-stage diffusion model; it needs --objective "
                        "diffusion")
    if cfg.regression_model and cfg.recompute_statistics:
        problems.append("--regression_model fixes the statistics (the regression model's); fine-tune it first to "
                        "change them")
    has_validation = bool(cfg.validation_time or cfg.validation_lat_box or cfg.validation_lon_box)
    if cfg.dataset == "glosea4-ts-x4":
        has_validation = has_validation or glosea4_splits(cfg)[1] is not None
    two_stage = cfg.objective == "diffusion" and (kind == "two-stage" or cfg.regression_model is not None
                                                  or cfg.two_stage)
    if cfg.calibrate_spread and not two_stage:
        problems.append("--calibrate_spread scales a two-stage model's stochastic_std; this run trains no two-stage "
                        "model")
    if cfg.calibrate_spread and not has_validation:
        problems.append("--calibrate_spread needs a validation split (validation_time or validation_lat_box/lon_box)")
    if cfg.calibration_target not in ("ssr", "crps"):
        problems.append(f"--calibration_target must be 'ssr' or 'crps', got {cfg.calibration_target!r}")
    if cfg.two_stage and (cfg.init_from or cfg.regression_model or cfg.objective != "diffusion"):
        problems.append("--two_stage trains both stages from scratch: leave out --init_from (a two-stage base is "
                        "fine-tuned as one anyway), --regression_model and --objective regression")
    if cfg.regression_steps is not None and kind != "two-stage" and not cfg.two_stage:
        problems.append("--regression_steps is the stage-1 length of a two-stage run (--two_stage, or --init_from a "
                        "two-stage model)")
    if cfg.push_to_hub and not cfg.hub_model_id:
        problems.append("--push_to_hub needs --hub_model_id")
    if problems:
        raise SystemExit("Inconsistent options:\n  - " + "\n  - ".join(problems))
    return cfg, kind


def glosea4_splits(cfg: TrainingConfig) -> tuple[tuple[str, str], tuple[str, str] | None]:
    """Train and validation month ranges of the GloSea4 benchmark.

    Its own splits unless ``train_time`` / ``validation_time`` say otherwise (e.g. a refit on training +
    validation months once the settings are fixed).

    Returns:
        ``(train, validation)`` as ``(start, end)`` strings; validation is ``None`` when the training range
        covers the validation month.

    Raises:
        ValueError: A range reaches the test month (never trained or validated on).
    """
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
            raise ValueError(f"--{name} {list(rng)} reaches the {glosea4.NAME} test month {test_start}: the test "
                             "month is never trained or validated on.")
    return train, val
