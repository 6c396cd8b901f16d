# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""The data of a training run: paired fields and splits, statistics, model-space fields, patches, batches.

A spatial validation box is held out by a mask, never by editing the data: its points are left out of the
statistics and (through the patches' ``mask``) out of the loss, and scored alone by the validation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import TrainingConfig, glosea4_splits

__all__ = ["TrainingData", "build_statistics", "load_pairs", "load_training_data", "outside_box", "training_batches"]

logger = logging.getLogger("dpdm_diffusers.training")


def load_pairs(cfg: TrainingConfig, units: dict | None = None):
    """The region's pairs, static fields and splits (:class:`dpdm_diffusers.user_data.RegionData`).

    Args:
        cfg: The resolved config.
        units: The model's units per variable when fine-tuning (data in compatible units is converted).

    Raises:
        ValueError: Unknown dataset, no files, or data the checks of ``user_data`` refuse.
    """
    from dpdm_diffusers import user_data

    if cfg.dataset == "glosea4-ts-x4":
        from dpdm_diffusers import glosea4

        bench = glosea4.load_glosea4_benchmark(static=bool(cfg.static_channels))
        train_rng, val_rng = glosea4_splits(cfg)
        split = {"train": {"time": slice(*train_rng)},
                 "validation": None if val_rng is None else {"time": slice(*val_rng)}}
        user_data.check_time_selections(bench.high_res["time"], split["train"], split["validation"],
                                        held_out_box=bool(cfg.validation_lat_box or cfg.validation_lon_box))
        n_fields = {k: 0 if v is None else _num_fields(bench.high_res.sel(**v)) for k, v in split.items()}
        describe = {
            "source": "GloSea4 surface_temperature, 13 members x 6 months (iris-sample-data, Open Government Licence)",
            "benchmark": f"{glosea4.NAME} (DATA.md): 144x192 N96 truth, 4x4 block-mean low-res 36x48",
            "train": f"{train_rng[0]} .. {train_rng[1]} ({n_fields['train']} fields)",
            "validation": ("none" if val_rng is None
                           else f"{val_rng[0]} .. {val_rng[1]} ({n_fields['validation']} fields)"),
            "test": "2012-01 (13 fields, never trained or validated on)",
            "static fields": "topography (pvlib Altitude.h5) and land fraction (global-land-mask), area-averaged",
        }
        static = bench.static[cfg.static_channels] if bench.static is not None else None
        vbox = None
        if cfg.validation_lat_box or cfg.validation_lon_box:
            vbox = user_data.box_indices(bench.grid, bench.scale_factor, cfg.validation_lat_box,
                                         cfg.validation_lon_box)
        return user_data.RegionData(bench, static, split["train"], split["validation"], vbox, describe)
    if cfg.dataset != "files":
        raise ValueError(f"Unknown dataset {cfg.dataset!r}; use 'files' or 'glosea4-ts-x4'.")
    if not cfg.high_res:
        raise ValueError("dataset=files needs --high_res paths (netCDF or zarr, globs allowed).")
    return user_data.load_region(
        cfg.high_res, low_res=cfg.low_res or None, scale_factor=cfg.scale_factor,
        variables=list(units) if units else (cfg.variables or None), variable_map=cfg.variable_map, units=units,
        declared_units=cfg.units,
        lat_box=cfg.lat_box, lon_box=cfg.lon_box, regular_grid=cfg.regular_grid,
        static_channels=cfg.static_channels, static_files=cfg.static_files, static_map=cfg.static_map,
        train_time=cfg.train_time, validation_time=cfg.validation_time,
        validation_lat_box=cfg.validation_lat_box, validation_lon_box=cfg.validation_lon_box,
    )


def _num_fields(ds) -> int:
    """2-D fields in ``ds``: the product of its non-spatial sizes (ensemble members x time steps...)."""
    from dpdm_diffusers.grids import grid_dims

    return int(np.prod([n for d, n in ds.sizes.items() if d not in grid_dims(ds)]))


def outside_box(shape: tuple[int, int], box: tuple[slice, slice] | None) -> np.ndarray | None:
    """``(H, W)`` bool: True outside ``box`` (the points training may use); ``None`` without a box."""
    if box is None:
        return None
    keep = np.ones(shape, dtype=bool)
    keep[box] = False
    return keep


def warn_scale_change(pairs, cfg, stats: dict, train, max_fields: int = 8, ratio: float = 0.25) -> list[str]:
    """Warn when the region's fine detail (high-res minus its interpolated low-res, on a few training fields) is
    below ``ratio`` of what the base model was trained on (its ``residual_std``), in the base's normalised units: a
    region at another scale (1.5 km fine-tuning a 140 km model) then trains far better with the statistics
    re-estimated (benchmarks/results/native_grids.md: 0.224 -> 0.133 K, bicubic 0.206). Returns the variables."""
    from dpdm_diffusers.data import regrid
    from dpdm_diffusers.grids import grid_dims

    low = pairs.low_res.sel(**train) if train else pairs.low_res
    high = pairs.high_res.sel(**train) if train else pairs.high_res
    spatial = grid_dims(high)
    others = [d for d in high.dims if d not in spatial]
    if others:
        high = high.stack(_s=others).isel(_s=slice(0, max_fields)).unstack("_s")
        low = low.stack(_s=others).isel(_s=slice(0, max_fields)).unstack("_s")
    lerp = regrid(low, pairs.grid, method=cfg.interpolation or "bilinear")
    small = []
    for v, t, std, res in zip(stats["variables"], stats["transforms"], stats["norm_std"], stats["residual_std"]):
        if t != "identity" or v not in high:
            continue
        detail = float(np.nanstd((high[v] - lerp[v]).values)) / float(std)
        if detail < ratio * float(res):
            small.append(v)
            logger.warning("%s: the fine detail of this data (%.3g of the base model's normalised units) is %.0f%% of "
                           "what the base model learnt (residual_std %.3g): another scale? Fine-tune with "
                           "--recompute-statistics (config recompute_statistics: true) to re-estimate the "
                           "statistics on this data.", v, detail, 100 * detail / float(res), float(res))
    return small


def build_statistics(cfg, pairs, static, train, base_config=None, exclude_box=None) -> dict:
    """Normalisation statistics of a run.

    Args:
        cfg: The resolved config (transforms, interpolation, static channels, ``recompute_statistics``).
        pairs: The region's ``PairedData``.
        static: Its static fields, or ``None``.
        train: The ``.sel`` indexer of the training split.
        base_config: The base model's config when fine-tuning: its statistics are kept unless
            ``cfg.recompute_statistics``.
        exclude_box: ``(lat_slice, lon_slice)`` of a validation box, left out of the statistics.

    Returns:
        The pipeline config's statistics keys (``variables``, ``norm_mean``, ``static_std``...).

    Raises:
        ValueError: The data lacks a variable of the base model.
    """
    from dpdm_diffusers.statistics import compute_statistics

    if base_config is not None:  # the base model's (or the regression stage's) way of interpolating, unless given
        if cfg.interpolation in (None, "auto"):
            cfg.interpolation = base_config["interpolation"]
    else:
        cfg.interpolation = default_interpolation(cfg.interpolation)
    if base_config is not None and not cfg.recompute_statistics:
        keys = ("variables", "units", "transforms", "norm_mean", "norm_std", "residual_std",
                "static_channels", "static_mean", "static_std")
        stats = {k: list(base_config[k]) for k in keys}
        missing = [v for v in stats["variables"] if v not in pairs.high_res.data_vars]
        if missing:
            raise ValueError(f"The base model downscales {stats['variables']}, the data lacks {missing}.")
        base_dry = list(base_config.get("dry_threshold") or [0.0] * len(stats["variables"]))
        stats["dry_threshold"] = [float(cfg.dry_threshold.get(v, d)) for v, d in zip(stats["variables"], base_dry)]
        warn_scale_change(pairs, cfg, stats, train)
        return stats
    mask = None
    keep = outside_box(pairs.grid.shape, exclude_box)
    if keep is not None:
        import xarray as xr

        from dpdm_diffusers.grids import grid_dims

        ya, xa = grid_dims(pairs.high_res)
        mask = xr.DataArray(keep, dims=(ya, xa), coords={ya: pairs.high_res[ya], xa: pairs.high_res[xa]})
    stats = compute_statistics(
        pairs.high_res, pairs.lerp(cfg.interpolation), variables=list(pairs.high_res.data_vars),
        transforms=cfg.transforms or None, train=train or None, static=static,
        static_channels=cfg.static_channels or None, mask=mask,
    )
    stats.setdefault("static_channels", [])
    stats.setdefault("static_mean", [])
    stats.setdefault("static_std", [])
    stats["dry_threshold"] = dry_thresholds(cfg.dry_threshold, stats["variables"], stats["units"], stats["transforms"])
    return stats


def default_interpolation(interpolation) -> str | list[str]:
    """``"auto"`` -> bicubic for every variable; anything else as given. Measured on the TIGGE benchmark
    (benchmarks/results/tigge_five_variables.md): bicubic is the best interpolation of all five variables, and as the
    base of a precipitation model it beats bilinear in RMSE, CRPS and reliability; its rare overshoot below zero at
    rain edges (3% of points, 0.03% of the total) is clipped by the non-negative transforms."""
    return "bicubic" if interpolation in (None, "auto") else interpolation


# precipitation's dry threshold when none is given, in mm (the usual "wet day" floor is 0.1-1 mm)
DEFAULT_DRY_DEPTH_MM = 0.1


def dry_thresholds(given: dict, variables, units, transforms) -> list[float]:
    """Per variable, ``given`` (your units) or, for a non-negative variable in depth or mass-per-area units,
    0.1 mm converted to them; 0 otherwise (rates: set one, since it depends on the accumulation period)."""
    from dpdm_diffusers.transforms import NON_NEGATIVE_TRANSFORMS
    from dpdm_diffusers.units import unit_factor

    unknown = sorted(set(given) - set(variables))
    if unknown:
        raise ValueError(f"--dry_threshold names {unknown}, which are not among the variables {list(variables)}.")
    out = []
    for v, u, t in zip(variables, units, transforms):
        if v in given:
            out.append(float(given[v]))
            continue
        value = 0.0
        if t in NON_NEGATIVE_TRANSFORMS:
            try:
                value = DEFAULT_DRY_DEPTH_MM * unit_factor("mm", u)[0]
            except ValueError:
                logger.warning("no default dry threshold for %s in %s (a rate?): set --dry_threshold", v, u)
        out.append(value)
    return out


@dataclass
class TrainingData:
    """Everything a run trains and validates on.

    Attributes:
        region: The paired fields and splits (:class:`dpdm_diffusers.user_data.RegionData`).
        stats: The pipeline config's statistics keys.
        fields: The training split in model space (``NormalizedFields``), a validation box masked out of the loss.
        dataset: Random patches of ``fields`` (``RandomPatchDataset``).
        validation: ``(low_res, truth, static)`` of the validation split, or ``None``.
    """

    region: Any
    stats: dict
    fields: Any
    dataset: Any
    validation: tuple | None


def load_training_data(cfg: TrainingConfig, stats_from=None) -> TrainingData:
    """Load the region, its statistics and its training patches.

    Args:
        cfg: The resolved config.
        stats_from: The pipeline whose statistics and units are kept (fine-tuning; the regression model of a
            two-stage run), or ``None``.
    """
    from dpdm_diffusers.samples import RandomPatchDataset, normalize_fields
    from dpdm_diffusers.transforms import Normalizer
    from dpdm_diffusers.user_data import validation_inputs

    units = dict(zip(stats_from.config.variables, stats_from.config.units)) if stats_from is not None else None
    region = load_pairs(cfg, units)
    pairs, train = region.pairs, region.train
    stats = build_statistics(cfg, pairs, region.static, train, None if stats_from is None else dict(stats_from.config),
                             exclude_box=region.validation_box)
    normalizer = Normalizer.from_config({**stats, "prediction": cfg.prediction})
    variables = stats["variables"]
    keep = outside_box(pairs.grid.shape, region.validation_box)  # the validation box is scored, never learnt from
    lerp = pairs.lerp(cfg.interpolation)[variables].sel(**train)
    fields = normalize_fields(pairs.high_res[variables].sel(**train), lerp, normalizer, region.static, loss_mask=keep)
    if keep is not None:
        ys, xs = region.validation_box
        logger.info("validation box: %d x %d high-res points left out of the training loss",
                    ys.stop - ys.start, xs.stop - xs.start)
    if min(fields.shape) < cfg.patch_size:
        logger.info("the %d x %d domain is smaller than the %d px patch: padded as at inference, scored on the real "
                    "domain only", *fields.shape, cfg.patch_size)
    dataset = RandomPatchDataset(fields, cfg.patch_size, seed=cfg.seed)
    logger.info("training on %d fields of %s, %d patches per epoch", fields.num_samples, fields.shape, len(dataset))
    return TrainingData(region, stats, fields, dataset, validation_inputs(region, cfg.validation_max_samples))


def training_batches(accelerator, dataloader, dataset, sampler, start_step: int, accumulation: int):
    """Endless training batches from ``start_step`` on, resumable exactly.

    Args:
        accelerator: The run's ``Accelerator`` (skips the batches a resumed epoch already used).
        dataloader: The prepared DataLoader of ``dataset`` (used without a sampler).
        dataset: The ``RandomPatchDataset``: its epoch sets the crops.
        sampler: A ``DevicePatchSampler``, or ``None``.
        start_step: The global step the run starts (or resumes) at.
        accumulation: Micro-steps per optimiser step.
    """
    if sampler is not None:  # crops of micro-step m are a function of (seed, process, m): resumable as is
        micro = start_step * accumulation
        while True:
            yield sampler.batch(micro)
            micro += 1
    steps_per_epoch = max(1, math.ceil(len(dataloader) / accumulation))
    step = start_step
    while True:
        # fresh crops each epoch; crops depend on (seed, epoch, i)
        dataset.set_epoch(step // steps_per_epoch)
        skip = (step % steps_per_epoch) * accumulation
        yield from accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        step = (step // steps_per_epoch + 1) * steps_per_epoch
