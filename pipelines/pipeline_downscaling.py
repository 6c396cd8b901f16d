# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""DownscalingPipeline: probabilistic downscaling of gridded climate fields (DPDM, Ling et al. 2024).

A conditional diffusion model turns a coarse field into an ensemble of fine fields. The UNet sees
``[noisy sample, interpolated low-res field, static fields]`` at every step; the domain is covered by
overlapping tiles of the model's patch size that are fused on one canvas at *every* step, so any
domain size works and there are no seams; members x tiles go through the UNet in batches.

With an optional ``regression_unet`` the pipeline is a two-stage "regression + residual diffusion" model
(CorrDiff, Mardani et al. 2024): a deterministic UNet predicts the conditional mean in one pass and the
diffusion UNet samples only what the mean misses, scaled by ``stochastic_std``. The ensemble mean then
starts from the regression's skill instead of having to be learnt by the (slower to train) diffusion model.

This file holds the sampling; the caller's conventions (xarray in and out) are :class:`~dpdm_diffusers.
field_processor.FieldProcessor`'s job, and loading/saving/sharing with its safety rules is :mod:`.hub_mixin`'s.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, logging, replace_example_docstring

from dpdm_diffusers.field_processor import FieldProcessor, PreparedFields
from dpdm_diffusers.grids import interpolate, interpolate_variables, interpolation_methods
from dpdm_diffusers.modeling import default_scheduler
from dpdm_diffusers.patching import PatchTiler
from dpdm_diffusers.seeding import (
    MAX_TIME_CORRELATION,
    TIME_UNITS,
    infer_time_unit,
    member_seeds,
    row_generators,
    temporal_samples,
    time_correlated_noise,
)
from dpdm_diffusers.transforms import Normalizer

from .hub_mixin import DownscalingHubMixin, write_pipeline_module  # noqa: F401 - write_pipeline_module: public API

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch, xarray as xr
        >>> from dpdm_diffusers import DownscalingPipeline

        >>> pipe = DownscalingPipeline.from_pretrained("models/dpdm-glosea4-ts-x4")
        >>> low_res = xr.open_dataset("coarse.nc")[["surface_temperature"]]  # (time, lat, lon), K
        >>> out = pipe(low_res, num_members=10, num_inference_steps=20,
        ...            generator=torch.Generator().manual_seed(0))
        >>> out.members  # xr.Dataset (member, time, lat, lon) on the 4x finer grid
        >>> out.mean.to_netcdf("mean.nc")
        ```
"""

OUTPUT_TYPES = ("xarray", "np", "pt", "latent")
OBJECTIVES = ("diffusion", "regression")
# x0 clipping is allowed only this wide (in model-space stds; real data stays within about +-14): enough to
# stop the blow-up of the x0 prediction at t ~ T of the cosine schedule (alpha_bar_999 = 2e-9) that
# makes unclipped 1000-step DDPM diverge, without touching the data (benchmarks/results/samplers.md)
MIN_CLIP_RANGE = 10.0
# a two-stage model's residual scale (calibrated values are about 0.5-3): far above any calibration, far below the
# values that turn members into +-1e30 K
MAX_STOCHASTIC_STD = 1000.0
# UNet -> the pipeline it was last registered with, for `DownscalingPipeline(**pipe.components)`
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# the config entries of __init__ (everything but the modules)
_STATISTICS = ("variables", "units", "transforms", "norm_mean", "norm_std", "residual_std", "static_channels",
               "static_mean", "static_std", "scale_factor", "patch_size", "prediction", "interpolation", "objective",
               "stochastic_std", "hub_id", "dry_threshold", "noise_time_correlation", "noise_time_unit")


@dataclass
class DownscalingPipelineOutput(BaseOutput):
    """Output of :class:`DownscalingPipeline`.

    Args:
        members: every ensemble member. ``xarray``: a Dataset (DataArray for DataArray input) with dims
            ``(member, *batch_dims, lat, lon)``; ``np``/``pt``: an array ``(member, batch, variable, lat, lon)``.
        mean: the ensemble mean (no ``member`` dim).
        std: the ensemble standard deviation (spread, ``ddof=1``; zeros for a single member).
    """

    members: Any
    mean: Any
    std: Any


@dataclass
class _Canvas:
    """The condition cut into tiles: what every UNet evaluation of one call shares."""

    tiler: PatchTiler
    cond_tiles: torch.Tensor  # (B * N, V + S, P, P), index b * N + tile
    lerp_norm: torch.Tensor  # (B, V, H, W) normalised interpolated input, for the way back to physical units
    invalid: np.ndarray | None  # (B, V, H, W) where the masked input leaves the output undefined
    num_batch: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.tiler.height, self.tiler.width


class DownscalingPipeline(DownscalingHubMixin, DiffusionPipeline):
    r"""Pipeline for probabilistic downscaling with a conditional diffusion model.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic
    methods (downloading, saving, running on a device, ...).

    Args:
        unet ([`UNet2DModel`]):
            Conditional UNet with ``in_channels = 2 * V + S`` and ``out_channels = V``.
        scheduler ([`SchedulerMixin`]):
            Any diffusers scheduler; the default is DDPM with the cosine schedule and no clipping.
        variables (`list[str]`): names of the V variables, in channel order.
        units (`list[str]`): physical units of each variable (inputs with other units are refused).
        transforms (`list[str]`): ``"identity"``, or ``"log1p"`` / ``"sqrt"`` for non-negative fields such as
            precipitation.
        norm_mean, norm_std (`list[float]`): per-variable statistics in transformed space.
        residual_std (`list[float]`): per-variable std of the normalised residual (residual target only).
        static_channels (`list[str]`): names of the S static fields, e.g. ``["topography", "land_sea_mask"]``.
        static_mean, static_std (`list[float]`): statistics of the static fields.
        scale_factor (`int`): grid refinement from the low-res to the high-res grid.
        patch_size (`int`): tile size in high-res pixels the UNet was trained on.
        prediction (`str`): ``"residual"`` (high-res minus interpolated low-res) or ``"full"``.
        interpolation (`str` or `list[str]`): ``"bilinear"`` or ``"bicubic"`` interpolation of the low-res input, for
            all variables or one per variable (bilinear suits precipitation: bicubic overshoots below zero).
        objective (`str`): ``"diffusion"`` (the UNet predicts noise; sampled with the scheduler) or
            ``"regression"`` (a deterministic baseline: one UNet pass at ``t = 0`` on zero noise predicts the
            target directly; every member is that same field and the spread is zero).
        regression_unet ([`UNet2DModel`], *optional*):
            A deterministic UNet (same channels as ``unet``, trained with ``objective="regression"``) whose
            prediction is the mean the diffusion UNet adds its samples to (diffusion objective only).
        stochastic_std (`list[float]`): per-variable std of the model-space target minus the regression mean,
            i.e. the scale of what the diffusion UNet generates when ``regression_unet`` is set.
        hub_id (`str`, *optional*): the model's Hub id, recorded by ``push_to_hub`` so that models fine-tuned
            from a local copy still name their base by its id.
        dry_threshold (`list[float]`, *optional*): per variable, output below it is set to exactly 0 (precipitation's
            dry threshold, in the variable's units, before ``conserve``); 0 (the default) keeps every value.
    """

    model_cpu_offload_seq = "regression_unet->unet"
    _optional_components = ["regression_unet"]
    _callback_tensor_inputs = ["latents", "model_output"]

    @property
    def num_timesteps(self) -> int:
        """Scheduler timesteps of the last call (Heun with 3 steps has 5; a regression model has 1)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. from ``callback_on_step_end``) to skip the remaining steps."""
        return getattr(self, "_interrupt", False)

    @property
    def normalizer(self) -> Normalizer:
        """Model-space scaling, built from the current config (so ``register_to_config`` applies, as for the processor)."""
        return Normalizer.from_config(self.config)

    @property
    def processor(self) -> FieldProcessor:
        """The pre/post-processing component, built from the current config (so ``register_to_config`` applies)."""
        return FieldProcessor.from_config(self.config)

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler,
        variables: Sequence[str] | None = None,
        units: Sequence[str] | None = None,
        transforms: Sequence[str] | None = None,
        norm_mean: Sequence[float] | None = None,
        norm_std: Sequence[float] | None = None,
        residual_std: Sequence[float] | None = None,
        static_channels: Sequence[str] | None = None,
        static_mean: Sequence[float] | None = None,
        static_std: Sequence[float] | None = None,
        scale_factor: int = 4,
        patch_size: int | None = None,
        prediction: str = "residual",
        interpolation: str | Sequence[str] = "bilinear",
        objective: str = "diffusion",
        regression_unet: UNet2DModel | None = None,
        stochastic_std: Sequence[float] | None = None,
        hub_id: str | None = None,
        dry_threshold: Sequence[float] | None = None,
        noise_time_correlation: float = 0.0,
        noise_time_unit: str | None = None,
    ):
        owner = _OWNERS.get(unet, lambda: None)() if unet is not None else None
        if variables is None and owner is not None:
            # `DownscalingPipeline(**pipe.components)`: the statistics come from the pipeline the UNet belongs to
            # (diffusers' components are modules only); arguments given explicitly still win
            given = {k: v for k, v in locals().items() if k in _STATISTICS}
            defaults = {k: p.default for k, p in inspect.signature(DownscalingPipeline.__init__).parameters.items()}
            merged = {k: (owner.config[k] if given[k] == defaults[k] else given[k]) for k in _STATISTICS}
            self.__init__(unet, scheduler, regression_unet=regression_unet, **merged)
            return
        super().__init__()
        self.model_card: str | None = None  # README.md of the folder it was loaded from / training; kept on save
        self.autocast_dtype: torch.dtype | None = None  # bf16/fp16 UNet arithmetic (dpdm_diffusers.speed)
        self.register_modules(unet=unet, scheduler=scheduler, regression_unet=regression_unet)
        variables = list(variables) if variables is not None else [f"var{i}" for i in range(unet.config.out_channels)]
        v = len(variables)
        static_channels = list(static_channels) if static_channels is not None else []
        s = len(static_channels)

        def floats(values, default, n):
            return [float(x) for x in values] if values is not None else [default] * n

        config = dict(
            variables=variables,
            units=list(units) if units is not None else ["1"] * v,
            transforms=list(transforms) if transforms is not None else ["identity"] * v,
            norm_mean=floats(norm_mean, 0.0, v),
            norm_std=floats(norm_std, 1.0, v),
            residual_std=floats(residual_std, 1.0, v),
            static_channels=static_channels,
            static_mean=floats(static_mean, 0.0, s),
            static_std=floats(static_std, 1.0, s),
            scale_factor=int(scale_factor),
            patch_size=int(patch_size if patch_size is not None else unet.config.sample_size),
            prediction=prediction,
            interpolation=interpolation if isinstance(interpolation, str) else list(interpolation),
            objective=objective,
            stochastic_std=floats(stochastic_std, 1.0, v),
            hub_id=hub_id,
            dry_threshold=floats(dry_threshold, 0.0, v),
            # measured by training on its data (training/stages.measure_noise_time_correlation); 0: independent steps
            noise_time_correlation=float(noise_time_correlation),
            noise_time_unit=noise_time_unit,
        )
        Normalizer.from_config(config)  # validates lengths, transforms, prediction
        self._check_components(unet, config)
        if regression_unet is not None:
            self._check_components(regression_unet, config, name="regression_unet")
            if objective != "diffusion":
                raise ValueError("regression_unet is the mean of a diffusion model; it needs objective='diffusion'.")
        if len(config["dry_threshold"]) != v or min(config["dry_threshold"]) < 0:
            raise ValueError(f"dry_threshold must hold one value >= 0 per variable {variables}, got "
                             f"{config['dry_threshold']}.")
        if not 0.0 <= config["noise_time_correlation"] <= MAX_TIME_CORRELATION:
            raise ValueError(f"noise_time_correlation must be in [0, {MAX_TIME_CORRELATION}], got "
                             f"{config['noise_time_correlation']}.")
        if noise_time_unit is not None and noise_time_unit not in TIME_UNITS:
            raise ValueError(f"noise_time_unit must be one of {TIME_UNITS}, got {noise_time_unit!r}.")
        if len(config["stochastic_std"]) != v or not all(0 < x <= MAX_STOCHASTIC_STD for x in config["stochastic_std"]):
            raise ValueError(f"stochastic_std must hold one value in (0, {MAX_STOCHASTIC_STD:g}] per variable "
                             f"{variables}, got {config['stochastic_std']}.")
        for key in ("norm_mean", "norm_std", "residual_std", "static_mean", "static_std", "dry_threshold"):
            if not np.isfinite(config[key]).all():
                raise ValueError(f"{key} must be finite, got {config[key]}.")
        self.register_to_config(**config)
        for module in (unet, regression_unet):
            if module is not None:  # weak links only (no cycle, nothing added to the module): see the top of __init__
                _OWNERS[module] = weakref.ref(self)

    @staticmethod
    def _check_components(unet, config, name: str = "unet"):
        v, s = len(config["variables"]), len(config["static_channels"])
        if unet.config.out_channels != v or unet.config.in_channels != 2 * v + s:
            raise ValueError(
                f"Incompatible checkpoint: the {name} has in_channels={unet.config.in_channels}, "
                f"out_channels={unet.config.out_channels}, but {v} variables {config['variables']} and {s} static "
                f"channels {config['static_channels']} need in_channels={2 * v + s}, out_channels={v}."
            )
        factor = 2 ** (len(unet.config.block_out_channels) - 1)
        if config["patch_size"] % factor:
            raise ValueError(
                f"patch_size {config['patch_size']} is not divisible by the {name}'s downsampling factor {factor}.")
        if config["objective"] not in OBJECTIVES:
            raise ValueError(f"Unknown objective {config['objective']!r}; expected one of {OBJECTIVES}.")
        if config["scale_factor"] < 1:
            raise ValueError(f"scale_factor must be >= 1, got {config['scale_factor']}.")
        interpolation_methods(config["interpolation"], v)  # one known method, or one per variable

    @classmethod
    def from_unet(cls, unet: UNet2DModel, scheduler=None, **config) -> DownscalingPipeline:
        """Build a pipeline around a UNet with the default (cosine DDPM, unclipped) scheduler."""
        return cls(unet=unet, scheduler=scheduler if scheduler is not None else default_scheduler(), **config)

    def with_config(self, **changes) -> DownscalingPipeline:
        """A pipeline sharing this one's components (no copy of the weights) with some components or config values
        changed, e.g. ``pipe.with_config(stochastic_std=[0.5])`` to sample with another spread, leaving ``pipe`` as
        it is."""
        config = {k: v for k, v in self.config.items() if not k.startswith("_") and k not in self.components}
        modules = {k: getattr(self, k) for k in ("unet", "scheduler", "regression_unet")}
        unknown = sorted(set(changes) - set(config) - set(modules))
        if unknown:
            raise ValueError(f"Unknown keys {unknown}; a pipeline has {sorted(modules)} and config {sorted(config)}.")
        pipe = type(self)(**{**modules, **config, **changes})
        pipe.model_card, pipe.autocast_dtype = self.model_card, self.autocast_dtype
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def regression_pipeline(self) -> DownscalingPipeline:
        """The deterministic first stage of a two-stage pipeline as a pipeline of its own (shares weights)."""
        if self.regression_unet is None:
            raise ValueError("This pipeline has no regression_unet (it is not a two-stage model).")
        pipe = self.with_config(unet=self.regression_unet, regression_unet=None, objective="regression",
                                stochastic_std=None)
        pipe.model_card = None  # the two-stage model's card does not describe its first stage
        return pipe

    # ------------------------------------------------------------------------------------------
    # the steps of __call__
    # ------------------------------------------------------------------------------------------
    def check_inputs(self, num_members, num_inference_steps, tiles_per_call, output_type,
                     callback_on_step_end_tensor_inputs, noise_time_correlation: float = 0.0) -> None:
        """Refuse call arguments that cannot work, before any data is touched."""
        for name, value in (("num_members", num_members), ("num_inference_steps", num_inference_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {value!r}.")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if isinstance(tiles_per_call, bool) or not isinstance(tiles_per_call, (int, np.integer)) or tiles_per_call < 1:
            raise ValueError(f"tiles_per_call must be a positive integer, got {tiles_per_call!r}.")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not among {self._callback_tensor_inputs}.")
        if output_type is not None and output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}.")
        if not 0.0 <= float(noise_time_correlation) <= MAX_TIME_CORRELATION:
            raise ValueError(f"noise_time_correlation must be in [0, {MAX_TIME_CORRELATION}], got "
                             f"{noise_time_correlation}.")
        if self.config.objective == "regression":
            return  # no sampler is used
        if hasattr(self.scheduler, "precondition_inputs") and hasattr(self.scheduler, "precondition_outputs"):
            raise ValueError(
                f"{type(self.scheduler).__name__} preconditions inputs and outputs for EDM-trained networks "
                "(sigma_data, c_skip, c_out); this model is a DDPM eps-prediction network, so its samples would be "
                "meaningless. Use e.g. EulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                "use_karras_sigmas=True).")
        sched = self.scheduler.config
        clip_range = getattr(sched, "clip_sample_range", 1.0)
        if (getattr(sched, "clip_sample", False) and clip_range < MIN_CLIP_RANGE) or getattr(sched, "thresholding", False):
            raise ValueError(
                f"The scheduler clips (clip_sample=True, clip_sample_range={clip_range}) or thresholds samples, which "
                "distorts standardised climate data; build it with clip_sample=False, e.g. "
                "DDIMScheduler.from_config(pipe.scheduler.config), or with a wide clip_sample_range >= "
                f"{MIN_CLIP_RANGE:g} (model-space standard deviations) that only guards against blow-ups."
            )

    def prepare_condition(self, prepared: PreparedFields, tile_overlap: int | None, device) -> _Canvas:
        """``[normalised interpolated low-res, normalised static fields]`` on the target grid, padded to at least one
        patch (wrapping on global longitude) and cut into the tiles every UNet evaluation reuses."""
        cfg, norm = self.config, self.normalizer
        lerp = interpolate_variables(prepared.values, prepared.src, prepared.dst, cfg.interpolation)  # (B, V, H, W)
        invalid = None
        if np.isnan(prepared.values).any():  # nan_policy="mask" (the processor refused NaN otherwise)
            # the bilinear stencil tells where the input is undefined; those points are filled, then re-masked
            invalid = np.isnan(interpolate(prepared.values, prepared.src, prepared.dst, "bilinear")) | np.isnan(lerp)
        static = torch.from_numpy(prepared.static) if prepared.static is not None else None
        # NaN (masked mode only) becomes the variable's mean (0 once normalised)
        cond = torch.nan_to_num(norm.condition(torch.from_numpy(np.ascontiguousarray(lerp)).float(), static), nan=0.0)
        lerp_norm = cond[:, : norm.num_variables]
        num_batch, (height, width), patch = cond.shape[0], prepared.dst.shape, cfg.patch_size
        pad_h, pad_w = max(0, patch - height), max(0, patch - width)
        if pad_h or pad_w:
            cond = torch.nn.functional.pad(cond, (0, pad_w, 0, 0), mode="circular" if prepared.periodic else "replicate")
            cond = torch.nn.functional.pad(cond, (0, 0, 0, pad_h), mode="replicate")
        tiler = PatchTiler(*cond.shape[-2:], patch, tile_overlap, periodic_x=prepared.periodic and not pad_w)
        n = tiler.num_tiles
        cond_tiles = tiler.extract(cond.to(device), torch.arange(num_batch).repeat_interleave(n),
                                   torch.arange(n).repeat(num_batch))
        return _Canvas(tiler, cond_tiles, lerp_norm, invalid, num_batch, height, width)

    def time_correlation(self, layout, noise_time_correlation: float | None, noise_time_unit: str | None):
        """``(rho, samples)`` for :meth:`prepare_latents` when members' noise is correlated in time, else ``None``.

        ``rho`` is the call's, else the model's own where the input has a time axis; the unit is the call's, else
        the data's own spacing, else the model's (a single time step)."""
        cfg = self.config
        if noise_time_correlation is None:
            has_time = not layout.is_array and "time" in layout.batch_dims and "time" in layout.template.coords
            noise_time_correlation = cfg.get("noise_time_correlation", 0.0) if has_time else 0.0
        if not noise_time_correlation:
            return None
        if layout.is_array:
            raise ValueError("noise_time_correlation needs xarray input with a time coordinate.")
        times = layout.template["time"].values if "time" in layout.template.coords else ()
        unit = noise_time_unit or (infer_time_unit(times) if len(times) > 1 else cfg.get("noise_time_unit"))
        unit = unit or infer_time_unit(times)  # one step and no unit anywhere: the clear error
        return float(noise_time_correlation), temporal_samples(layout.template, layout.batch_dims, "time", unit)

    def prepare_latents(self, seeds: Sequence[int], sample_keys: Sequence[str], canvas: _Canvas, num_members: int,
                        latents: torch.Tensor | None, device, temporal: tuple | None = None
                        ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Unit Gaussian noise ``(len(seeds) * B, V, canvas)``, rows member-major (``k * B + b``), one generator
        stream per row seeded by (member seed, sample key) (:mod:`dpdm_diffusers.seeding`); or the caller's
        ``latents``. ``temporal``: ``(rho, samples)`` for initial noise correlated in time
        (:func:`~dpdm_diffusers.seeding.time_correlated_noise`). Returns the latents on ``device`` and the row
        generators (stochastic samplers draw from them)."""
        num_vars, (h, w), num_batch = self.unet.config.out_channels, canvas.shape, canvas.num_batch
        self._check_memory(len(seeds) * num_batch, 2 * num_vars + self.normalizer.num_static, h, w, device)
        gens = row_generators(seeds, sample_keys)
        if latents is None and temporal is not None:
            latents = time_correlated_noise(seeds, temporal[1], (num_vars, h, w), temporal[0])
        elif latents is None:
            latents = torch.cat([torch.randn((1, num_vars, h, w), generator=g) for g in gens])
        else:
            expected = (num_members * num_batch, num_vars, h, w)
            if tuple(latents.shape) == (num_members, num_batch, num_vars, h, w):
                latents = latents.reshape(expected)
            if tuple(latents.shape) != expected:
                raise ValueError(
                    f"latents must have shape {expected} (members x batch, variables, canvas) or "
                    f"{(num_members, num_batch, num_vars, h, w)}, got {tuple(latents.shape)}.")
            latents = latents.detach().float().cpu()[: len(seeds) * num_batch]
        return latents.to(device), gens

    def _check_memory(self, rows: int, channels: int, height: int, width: int, device) -> None:
        """Refuse, with the estimate, a call whose canvases cannot fit, before allocating them (stream long records
        with `dpdm downscale`, which takes a few time steps at a time)."""
        need = rows * channels * height * width * 4 * 8  # latents, outputs, accumulators, multistep history: ~8 copies
        try:
            if torch.device(device).type == "cuda":
                free = torch.cuda.mem_get_info(torch.device(device))[0]
            else:
                import psutil

                free = psutil.virtual_memory().available
                free = min(free, _address_space_left())  # `ulimit -v` (RLIMIT_AS) caps this process below that
        except Exception:  # no way to tell: do not guess
            return
        if need > free:
            raise MemoryError(
                f"This call needs about {need / 2**30:.1f} GiB ({rows} member x sample canvases of {height} x {width} "
                f"points) but {free / 2**30:.1f} GiB are free on {device}. Use fewer members or time steps per call, "
                "a smaller domain, or `dpdm downscale`, which streams a record a few time steps at a time.")

    def _fused_unet(self, model, canvas_values: torch.Tensor, t, canvas: _Canvas, tiles_per_call: int) -> torch.Tensor:
        """One UNet evaluation of every row of ``canvas_values`` (rows member-major ``k * B + b``): all (row, tile)
        pairs go through ``model`` in batches of ``tiles_per_call`` and are fused back into one canvas with the
        tiler's window."""
        tiler, n_tiles = canvas.tiler, canvas.tiler.num_tiles
        num_rows, dev = canvas_values.shape[0], canvas_values.device
        pair_rows = torch.arange(num_rows).repeat_interleave(n_tiles)
        pair_tiles = torch.arange(n_tiles).repeat(num_rows)
        pair_cond = (pair_rows % canvas.num_batch) * n_tiles + pair_tiles  # index into cond_tiles (b * N + tile)
        acc = torch.zeros(num_rows, model.config.out_channels, tiler.height * tiler.width, device=dev)
        for start in range(0, len(pair_rows), tiles_per_call):
            rows, tiles = pair_rows[start : start + tiles_per_call], pair_tiles[start : start + tiles_per_call]
            x = tiler.extract(canvas_values, rows, tiles)
            inp = torch.cat([x, canvas.cond_tiles[pair_cond[start : start + tiles_per_call].to(dev)]], dim=1)
            if self.autocast_dtype is not None:  # reduced-precision arithmetic, float32 weights and sampler state
                with torch.autocast(dev.type, dtype=self.autocast_dtype):
                    out = model(inp, t).sample
            else:
                out = model(inp.to(model.dtype), t).sample
            tiler.accumulate(acc, out.float(), rows, tiles)
        return tiler.normalize(acc)

    def _extra_step_kwargs(self, generator, eta):
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def _warn_if_sampler_starts_at_t_max(self, timesteps) -> None:
        alphas = getattr(self.scheduler, "alphas_cumprod", None)
        if alphas is None or getattr(self.scheduler.config, "clip_sample", False):
            return
        a = float(alphas[int(timesteps[0])])
        if a < 1e-6:
            logger.warning(
                "The sampler starts at t=%d where alpha_bar=%.1e: its x0 estimate divides the eps error by %.0e and "
                "can blow up. Build samplers from the model's own config (Cls.from_config(pipe.scheduler.config)), "
                "whose schedule ends at t=959 (modeling.NUM_TRAIN_TIMESTEPS), or use a wide clip_sample_range.",
                int(timesteps[0]), a, a**0.5,
            )

    def decode_latents(self, latents: torch.Tensor, canvas: _Canvas, num_members: int) -> torch.Tensor:
        """Model-space latents ``(rows, V, canvas)`` -> physical members ``(M, B, V, H, W)`` on the target grid
        (crop, de-normalise, add back the interpolated input for residual models)."""
        rows = latents.shape[0] // canvas.num_batch
        latents = latents[..., : canvas.height, : canvas.width].float().cpu()
        members = self.normalizer.from_model_space(latents, canvas.lerp_norm.repeat(rows, 1, 1, 1))
        members = members.reshape(rows, canvas.num_batch, *members.shape[1:])
        members = members.expand(num_members, -1, -1, -1, -1).contiguous()
        gaps = torch.from_numpy(canvas.invalid)[None] if canvas.invalid is not None else torch.zeros((), dtype=torch.bool)
        if not bool((torch.isfinite(members) | gaps).all()):  # e.g. NaN weights: never an unexplained NaN
            raise FloatingPointError("The model produced non-finite values (NaN or inf weights, or a diverging "
                                     "sampler); nothing is returned.")
        return members

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        low_res,
        topography=None,
        land_sea_mask=None,
        static_fields=None,
        target_grid=None,
        num_members: int = 1,
        num_inference_steps: int = 20,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        tiles_per_call: int | None = None,
        tile_overlap: int | None = None,
        nan_policy: str = "raise",
        member_dim: str = "member",
        output_type: str | None = None,
        return_dict: bool = True,
        variable_map: Mapping[str, str] | None = None,
        conserve: bool = False,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        batch_size: int | None = None,
        noise_time_correlation: float | None = None,
        noise_time_unit: str | None = None,
    ):
        r"""
        Downscale ``low_res`` into ``num_members`` high-resolution ensemble members.

        Args:
            low_res (`xr.Dataset`, `xr.DataArray`, `torch.Tensor` or `np.ndarray`):
                The coarse field in physical units. xarray input needs regular ``lat``/``latitude`` and
                ``lon``/``longitude`` dims plus any batch dims (e.g. ``time``) and exactly the model's
                variables; arrays are ``(batch, variable, lat, lon)`` or ``(variable, lat, lon)``.
            topography (`xr.DataArray` or array, *optional*):
                Surface elevation (m) on the target grid; shorthand for ``static_fields["topography"]``.
            land_sea_mask (`xr.DataArray` or array, *optional*):
                Land fraction (0..1, 1 = land) on the target grid; shorthand for ``static_fields["land_sea_mask"]``.
            static_fields (`Mapping[str, xr.DataArray | array]`, `xr.Dataset` or array `(S, lat, lon)`, *optional*):
                The model's static channels on the target grid. When omitted for xarray input they are
                derived from packaged global data (needs the ``data`` extra).
            target_grid (`xr.Dataset`/`xr.DataArray` with lat/lon, or `Grid`, *optional*):
                The high-res grid. Defaults to the low-res grid refined by the model's ``scale_factor``.
                Its spacing must match ``scale_factor``.
            num_members (`int`, defaults to 1): ensemble size; members differ only by their noise.
            num_inference_steps (`int`, defaults to 20): denoising steps of the scheduler. With the saved
                DPM-Solver++, 20 steps give an ensemble-mean RMSE within 1.1% of 1000-step DDPM at 1/50 of the UNet
                evaluations (benchmarks/results/samplers.md); fewer steps narrow the spread, so calibrate a two-stage
                model's spread (`dpdm calibrate`) with the step count you sample with.
            generator (`torch.Generator` or list of `torch.Generator`, *optional*):
                Seeds the ensemble. With one generator seeded ``s``, member ``k`` of a sample is the same field
                whatever ``num_members`` (> k), ``tiles_per_call``, tiling, or the other samples in the call: its noise is
                keyed by the sample's coordinate values (e.g. its time stamp), so a record split into chunks, processes
                or resumed runs gives the same members. Arrays and tensors carry no coordinates, so their samples are
                keyed by position (``#0``, ``#1``...): the same field as an array and as xarray gets different (each
                reproducible) members; use xarray wherever members must match across calls. Two samples with the
                same coordinates are refused. A list gives one generator per member.
            eta (`float`, defaults to 0.0): DDIM's eta (ignored by schedulers without it).
            tiles_per_call (`int`, *optional*): tiles (over all members and batch entries) per UNet call, a memory /
                speed knob that never changes the result; by default 16 on CPU and 256 on a GPU
                (`speed.default_tiles_per_call`; on one H100, 33 members x 13 fields took 31.4 s with 16 and 3.4 s
                with 256). The number of samples is ``num_members`` x the input's batch entries.
            tile_overlap (`int`, *optional*): minimum tile overlap in pixels (default: a quarter patch).
            nan_policy (`str`, defaults to ``"raise"``): ``"raise"`` refuses NaN in ``low_res``; ``"mask"``
                fills NaN for the network and returns NaN wherever the interpolated input is undefined.
            member_dim (`str`, defaults to ``"member"``): name of the ensemble dimension in xarray output.
            output_type (`str`, *optional*): ``"xarray"`` (default for xarray input), ``"np"`` or ``"pt"``
                (default for tensor input).
            return_dict (`bool`, defaults to True): return a [`DownscalingPipelineOutput`] instead of a tuple.
            variable_map (`Mapping[str, str]`, *optional*): your variable names -> the model's, e.g.
                ``{"air_temperature": "surface_temperature"}`` when your variable stands in for the model's (whether
                it may is your call; fine-tune on your data to adapt the model). Output keeps your names. Units must
                be set on every variable; compatible units (``degC`` for ``K``) are converted, output is in the
                model's units.
            conserve (`bool`, defaults to False): for inputs that are block means of the target (each coarse cell the
                mean of its ``scale_factor`` x ``scale_factor`` fine cells, as `data.coarsen` makes them), add to
                every member the difference between the input and the member's own block means, so that each member
                coarsens back to the input exactly: the L2 projection onto fields consistent with the input
                (`dpdm_diffusers.conservation`). Additive for ``identity`` variables, multiplicative for ``log1p``
                and ``sqrt`` (non-negative) ones. Needs the default target grid (the low-res grid refined).
            latents (`torch.Tensor`, *optional*): the initial noise in model space, ``(num_members * batch, V, H, W)``
                or ``(num_members, batch, V, H, W)``, members major, on the canvas (the target grid, padded to at
                least one patch: ``max(H, patch_size)``). Unscaled unit Gaussian, as diffusers' ``prepare_latents``
                takes it; replaces the generator's noise (members are then those of your latents).
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called as
                ``callback_on_step_end(pipe, step, timestep, callback_kwargs)`` after every denoising step with
                the tensors named in ``callback_on_step_end_tensor_inputs``; a returned ``{"latents": ...}`` replaces
                the running latents (model space, rows member-major). Set ``pipe._interrupt = True`` to stop early. A
                regression (deterministic) model takes one UNet pass and no scheduler steps: no callback is made.
            callback_on_step_end_tensor_inputs (`Sequence[str]`, defaults to ``("latents",)``): tensors passed to the
                callback, from ``pipe._callback_tensor_inputs`` (``latents``, ``model_output``).
            batch_size (`int`, *optional*): deprecated name of ``tiles_per_call`` (in diffusers ``batch_size``
                counts samples; here it never did: use ``num_members`` for more samples).
            noise_time_correlation (`float`, *optional*):
                Lag-1 correlation in time (0..0.95) of each member's initial noise: an AR(1) series over the
                ``time`` coordinate, keyed by the time stamp so chunks and resumed runs stay exact. 0 draws every
                time step independently. Default: the model's ``noise_time_correlation`` (what training measured
                as the persistence of the truth's fine-scale residual on its data; 0 for models that did not),
                applied only where the input has a ``time`` coordinate. With a deterministic sampler (DDIM,
                DPM-Solver++) members then keep part of their fine-scale anomaly from one step to the next;
                stochastic samplers (DDPM) add independent noise at every denoising step, which this does not
                correlate. A value given here needs xarray input with a ``time`` coordinate.
            noise_time_unit (`str`, *optional*):
                The step of that series: ``"year"``, ``"month"`` or ``"day"`` (default: read from the first two
                time stamps, else the model's ``noise_time_unit``; a call with one time step needs one of them).

        Examples:

        Returns:
            [`DownscalingPipelineOutput`] or `tuple` ``(members, mean, std)`` in physical units. With
            ``output_type="latent"``: the final model-space latents ``(num_members, batch, V, H, W)`` as ``members``
            (a torch tensor on the target grid, before de-normalisation and the interpolated input are added
            back), their mean and std.
        """
        # 1. Check arguments
        if batch_size is not None:
            import warnings

            if tiles_per_call is not None:
                raise ValueError("Pass tiles_per_call only (batch_size is its deprecated name).")
            warnings.warn("`batch_size` is deprecated: it counts tiles per UNet call, not samples. Use "
                          "tiles_per_call= (and num_members= for more samples).", FutureWarning, stacklevel=2)
            tiles_per_call = batch_size
        if tiles_per_call is None:
            from dpdm_diffusers.speed import default_tiles_per_call

            tiles_per_call = default_tiles_per_call(self._execution_device)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(num_members, num_inference_steps, tiles_per_call, output_type,
                          callback_on_step_end_tensor_inputs, noise_time_correlation or 0.0)
        if topography is not None or land_sea_mask is not None:
            if static_fields is not None:
                raise ValueError("Pass static fields either as static_fields or as topography/land_sea_mask, not both.")
            static_fields = {k: f for k, f in (("topography", topography), ("land_sea_mask", land_sea_mask))
                             if f is not None}

        # 2. Preprocess: physical values (B, V, h, w) on ascending grids, static fields, the caller's layout
        prepared = self.processor.preprocess(low_res, static_fields, target_grid, member_dim, nan_policy, variable_map)
        layout = prepared.layout
        if output_type is None:
            output_type = "xarray" if not layout.is_array else ("pt" if layout.tensor else "np")
        if output_type == "xarray" and layout.is_array:
            raise ValueError("output_type='xarray' needs xarray input (arrays carry no coordinates).")
        device, cfg = self._execution_device, self.config

        # 3. Condition = [normalised interpolated low-res, normalised static fields], cut into tiles
        canvas = self.prepare_condition(prepared, tile_overlap, device)

        # 4. Initial noise: a member of a sample is the same field whatever batch, chunk, process or tiling made it
        #    (seeded by the sample's key, never its position); every member of a deterministic model is one field
        regression = cfg.objective == "regression"
        seeds = member_seeds(generator, num_members)[: 1 if regression else None]
        temporal = None if regression else self.time_correlation(layout, noise_time_correlation, noise_time_unit)
        latents, row_gens = self.prepare_latents(seeds, layout.sample_keys, canvas, num_members, latents, device,
                                                 temporal)
        fused = dict(canvas=canvas, tiles_per_call=tiles_per_call)
        t0 = torch.zeros(1, dtype=torch.long, device=device)

        if regression:
            # 5a. Deterministic objective: one UNet pass on zero noise at t = 0 predicts the target
            self._num_timesteps, self._interrupt = 1, False
            with self.progress_bar(total=1) as progress_bar:
                latents = self._fused_unet(self.unet, torch.zeros_like(latents), t0, **fused)
                progress_bar.update()
        else:
            # 5. Timesteps; two-stage models: the regression UNet's mean, once per batch entry
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps = self.scheduler.timesteps
            self._warn_if_sampler_starts_at_t_max(timesteps)
            latents = latents * self.scheduler.init_noise_sigma
            extra_step_kwargs = self._extra_step_kwargs(row_gens, eta)
            regression_mean = None
            if self.regression_unet is not None:
                zero = torch.zeros(canvas.num_batch, *latents.shape[1:], device=device)
                regression_mean = self._fused_unet(self.regression_unet, zero, t0, **fused)

            # 6. Denoising loop: all tiles of all rows through the UNet in batches, fused on the canvas at every
            #    step, then one scheduler.step for the whole canvas (multistep solvers keep one history). The bar
            #    counts inference steps: second-order samplers (Heun, KDPM2) take `order` timesteps per step.
            self._num_timesteps, self._interrupt = len(timesteps), False
            order = getattr(self.scheduler, "order", 1)
            num_warmup_steps = len(timesteps) - num_inference_steps * order
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    model_in = self.scheduler.scale_model_input(latents, t)
                    model_output = self._fused_unet(self.unet, model_in, t, **fused)
                    latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample
                    if callback_on_step_end is not None:
                        available = {"latents": latents, "model_output": model_output}
                        callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                        latents = callback_outputs.pop("latents", latents)
                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % order == 0):
                        progress_bar.update()
            if regression_mean is not None:  # sample = mean + stochastic_std * generated residual
                scale = torch.tensor(cfg.stochastic_std, device=device, dtype=latents.dtype).view(1, -1, 1, 1)
                latents = regression_mean.repeat(len(seeds), 1, 1, 1) + scale * latents

        # 7. Post-process: back to physical units on the target grid, in the caller's layout
        if output_type == "latent":
            self.maybe_free_model_hooks()
            lat = latents[..., : canvas.height, : canvas.width].float().cpu()
            lat = lat.reshape(len(seeds), canvas.num_batch, *lat.shape[1:]).expand(num_members, -1, -1, -1, -1)
            out = _with_stats(lat.contiguous())
            return DownscalingPipelineOutput(*out) if return_dict else out
        members = self.processor.apply_dry_threshold(self.decode_latents(latents, canvas, num_members))
        if canvas.invalid is not None:  # before conserving: a block's mean is then over its valid cells only
            members = members.masked_fill(torch.from_numpy(canvas.invalid)[None], float("nan"))
        if conserve:
            members = self.processor.conserve(members, prepared)
        self.maybe_free_model_hooks()
        if output_type == "xarray":
            info = {
                "objective": cfg.objective
                + (" (regression mean + residual diffusion)" if self.regression_unet is not None and not regression
                   else ""),
                "scheduler": "none" if regression else type(self.scheduler).__name__,
                "num_inference_steps": 1 if regression else num_inference_steps,
                "num_members": num_members, "model": str(getattr(self, "name_or_path", "") or ""),
                "scale_factor": cfg.scale_factor, "patch_size": cfg.patch_size, "conserve": int(conserve),
            }
            out = self.processor.postprocess(members.numpy(), prepared, member_dim, info)
        else:
            out = _with_stats(members)
            if output_type == "np":
                out = tuple(o.numpy() for o in out)
        if not return_dict:
            return out
        return DownscalingPipelineOutput(*out)


def _address_space_left() -> float:
    """Bytes this process may still map under ``RLIMIT_AS`` (infinite without a limit or off POSIX)."""
    try:
        import resource

        import psutil

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        return float("inf") if soft == resource.RLIM_INFINITY else max(0.0, soft - psutil.Process().memory_info().vms)
    except (ImportError, OSError, ValueError):
        return float("inf")


def _with_stats(members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(members, mean, std)`` over the member axis (spread ``ddof=1``; zeros for one member)."""
    mean = members.mean(0)
    std = members.std(0, unbiased=True) if members.shape[0] > 1 else torch.zeros_like(mean)
    return members, mean, std
