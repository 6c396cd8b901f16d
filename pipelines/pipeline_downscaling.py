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
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, logging, replace_example_docstring

from dpdm_diffusers import __version__
from dpdm_diffusers.grids import INTERPOLATIONS, Grid, interpolate, lat_lon_names
from dpdm_diffusers.modeling import default_scheduler
from dpdm_diffusers.patching import PatchTiler
from dpdm_diffusers.transforms import Normalizer

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
NAN_POLICIES = ("raise", "mask")
OBJECTIVES = ("diffusion", "regression")
# x0 clipping is allowed only this wide (in model-space stds; real data stays within about +-14): enough to
# stop the blow-up of the x0 prediction at t ~ T of the cosine schedule (alpha_bar_999 = 2e-9) that
# makes unclipped 1000-step DDPM diverge, without touching the data (benchmarks/results/samplers.md)
MIN_CLIP_RANGE = 10.0


# The module file every saved folder carries, so that diffusers' generic loader finds the class the way it finds any
# Hub pipeline (`_class_name: [module, class]` in model_index.json, loaded with trust_remote_code=True). It only
# re-exports the installed package's class: the "remote code" is one import line, and `DownscalingPipeline.from_pretrained`
# never runs it.
PIPELINE_MODULE = "pipeline_downscaling"
PIPELINE_MODULE_SOURCE = '''"""Loader stub for diffusers' generic entry point; the pipeline itself comes from the installed package.

    pip install dpdm-diffusers
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("<this folder or Hub id>", trust_remote_code=True)

`dpdm_diffusers.DownscalingPipeline.from_pretrained(...)` loads the same folder without running this file.
"""

from dpdm_diffusers.pipelines.pipeline_downscaling import DownscalingPipeline, DownscalingPipelineOutput  # noqa: F401
'''


def write_pipeline_module(folder) -> None:
    """Make a saved folder loadable by ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``: write the
    module stub and point ``model_index.json``'s ``_class_name`` at it."""
    import json
    import os

    with open(os.path.join(folder, f"{PIPELINE_MODULE}.py"), "w", encoding="utf-8") as f:
        f.write(PIPELINE_MODULE_SOURCE)
    path = os.path.join(folder, "model_index.json")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    index["_class_name"] = [PIPELINE_MODULE, "DownscalingPipeline"]
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _is_edm(scheduler) -> bool:
    """EDM samplers precondition inputs and outputs for EDM-trained networks (sigma_data, c_skip, c_out)."""
    return hasattr(scheduler, "precondition_inputs") and hasattr(scheduler, "precondition_outputs")


def _key_text(value) -> str:
    """A coordinate value as stable text: ISO time for datetime64/cftime, repr for numbers, str otherwise."""
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value, unit="s"))
    if hasattr(value, "isoformat"):  # cftime, datetime, pandas Timestamp
        return value.isoformat()
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def sample_keys(ds, batch_dims: Sequence[str]) -> list[str]:
    """One key per sample (C order over ``batch_dims``): ``"time=2016-01-16T12:00:00|realization=3"``. A dim without
    coordinate values is keyed by position (``"#0"``), as the batch axis of an array input is."""
    import itertools

    per_dim = []
    for d in batch_dims:
        if d in ds.coords:
            per_dim.append([f"{d}={_key_text(v)}" for v in ds[d].values])
        else:  # no coordinate values: keyed by position, like the batch axis of an array input
            per_dim.append([f"#{i}" for i in range(ds.sizes[d])])
    return ["|".join(combo) for combo in itertools.product(*per_dim)] if per_dim else [""]


def noise_seed(member_seed: int, key: str) -> int:
    """The seed of one member's noise for one sample: a hash of (member seed, sample key), stable across runs,
    machines and Python versions (blake2b, not ``hash``)."""
    import hashlib

    digest = hashlib.blake2b(f"{int(member_seed)}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63: a valid torch seed


class _own_class:
    """While loading through ``DownscalingPipeline.from_pretrained``, resolve the pipeline class to ``cls`` itself
    instead of importing the module named by ``_class_name`` (diffusers would otherwise ask for trust_remote_code).
    Only calls for ``cls`` are redirected; other pipelines loading meanwhile resolve as before."""

    def __init__(self, cls):
        self.cls = cls

    def __enter__(self):
        import diffusers.pipelines.pipeline_utils as pipeline_utils

        self.module, self.original = pipeline_utils, pipeline_utils._get_pipeline_class
        cls, original = self.cls, self.original

        def resolve(class_obj, *args, **kwargs):
            return class_obj if class_obj is cls else original(class_obj, *args, **kwargs)

        pipeline_utils._get_pipeline_class = resolve
        return self

    def __exit__(self, *exc):
        self.module._get_pipeline_class = self.original
        return False


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
class _Prepared:
    """Inputs brought to canonical form: physical values ``(B, V, h, w)``, ascending grids."""

    values: np.ndarray
    src: Grid
    dst: Grid
    static: np.ndarray | None  # (S, H, W) on dst
    meta: dict


class DownscalingPipeline(DiffusionPipeline):
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
        transforms (`list[str]`): ``"identity"`` or ``"log1p"`` (non-negative fields such as precipitation).
        norm_mean, norm_std (`list[float]`): per-variable statistics in transformed space.
        residual_std (`list[float]`): per-variable std of the normalised residual (residual target only).
        static_channels (`list[str]`): names of the S static fields, e.g. ``["topography", "land_sea_mask"]``.
        static_mean, static_std (`list[float]`): statistics of the static fields.
        scale_factor (`int`): grid refinement from the low-res to the high-res grid.
        patch_size (`int`): tile size in high-res pixels the UNet was trained on.
        prediction (`str`): ``"residual"`` (high-res minus interpolated low-res) or ``"full"``.
        interpolation (`str`): ``"bilinear"`` or ``"bicubic"`` interpolation of the low-res input.
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
        interpolation: str = "bilinear",
        objective: str = "diffusion",
        regression_unet: UNet2DModel | None = None,
        stochastic_std: Sequence[float] | None = None,
        hub_id: str | None = None,
    ):
        super().__init__()
        self.model_card: str | None = None  # README.md of the folder it was loaded from / training; kept on save
        self.autocast_dtype: torch.dtype | None = None  # bf16/fp16 UNet arithmetic (dpdm_diffusers.speed)
        self.register_modules(unet=unet, scheduler=scheduler, regression_unet=regression_unet)
        v = unet.config.out_channels
        variables = list(variables) if variables is not None else [f"var{i}" for i in range(v)]
        static_channels = list(static_channels) if static_channels is not None else []
        s = len(static_channels)
        config = dict(
            variables=variables,
            units=list(units) if units is not None else ["1"] * len(variables),
            transforms=list(transforms) if transforms is not None else ["identity"] * len(variables),
            norm_mean=[float(x) for x in norm_mean] if norm_mean is not None else [0.0] * len(variables),
            norm_std=[float(x) for x in norm_std] if norm_std is not None else [1.0] * len(variables),
            residual_std=[float(x) for x in residual_std] if residual_std is not None else [1.0] * len(variables),
            static_channels=static_channels,
            static_mean=[float(x) for x in static_mean] if static_mean is not None else [0.0] * s,
            static_std=[float(x) for x in static_std] if static_std is not None else [1.0] * s,
            scale_factor=int(scale_factor),
            patch_size=int(patch_size if patch_size is not None else unet.config.sample_size),
            prediction=prediction,
            interpolation=interpolation,
            objective=objective,
            stochastic_std=[float(x) for x in stochastic_std] if stochastic_std is not None else [1.0] * len(variables),
            hub_id=hub_id,
        )
        self.normalizer = Normalizer.from_config(config)  # validates lengths, transforms, prediction
        self._check_components(unet, config)
        if regression_unet is not None:
            self._check_components(regression_unet, config, name="regression_unet")
            if objective != "diffusion":
                raise ValueError("regression_unet is the mean of a diffusion model; it needs objective='diffusion'.")
        if len(config["stochastic_std"]) != len(variables) or min(config["stochastic_std"]) <= 0:
            raise ValueError(f"stochastic_std must hold one positive value per variable {variables}, got {config['stochastic_std']}.")
        self.register_to_config(**config)

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
            raise ValueError(f"patch_size {config['patch_size']} is not divisible by the {name}'s downsampling factor {factor}.")
        if config["objective"] not in OBJECTIVES:
            raise ValueError(f"Unknown objective {config['objective']!r}; expected one of {OBJECTIVES}.")
        if config["scale_factor"] < 1:
            raise ValueError(f"scale_factor must be >= 1, got {config['scale_factor']}.")
        if config["interpolation"] not in INTERPOLATIONS:
            raise ValueError(f"Unknown interpolation {config['interpolation']!r}; expected one of {tuple(INTERPOLATIONS)}.")

    @classmethod
    def from_unet(cls, unet: UNet2DModel, scheduler=None, **config) -> "DownscalingPipeline":
        """Build a pipeline around a UNet with the default (cosine DDPM, unclipped) scheduler."""
        return cls(unet=unet, scheduler=scheduler if scheduler is not None else default_scheduler(), **config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "DownscalingPipeline":
        """Load a saved pipeline (folder or Hub id). Weights load from safetensors only; the folder's model
        card (``README.md``) is kept in ``pipe.model_card`` so that ``save_pretrained`` keeps the lineage.

        The folder's module stub (for ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)``) is never
        run here: this class is the class, so no remote code is needed or executed."""
        import os

        if kwargs.get("use_safetensors") is False:
            raise ValueError("dpdm-diffusers loads weights from safetensors only (use_safetensors=False is refused).")
        if kwargs.pop("trust_remote_code", False) or kwargs.get("custom_pipeline") is not None:
            raise ValueError("DownscalingPipeline.from_pretrained runs no code from the folder (trust_remote_code and "
                             "custom_pipeline are refused); it needs none.")
        kwargs["use_safetensors"] = True
        cls._check_untrusted_config(pretrained_model_name_or_path, kwargs)
        with _own_class(cls):
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        path = str(pretrained_model_name_or_path)
        card = os.path.join(path, "README.md")
        if os.path.isdir(path):
            if os.path.isfile(card):
                with open(card, encoding="utf-8") as f:
                    pipe.model_card = f.read()
        else:  # a Hub id: it is the model's id, and its card comes from the same snapshot when cached
            if not pipe.config.get("hub_id"):
                pipe.register_to_config(hub_id=path)
            try:
                from huggingface_hub import hf_hub_download

                with open(hf_hub_download(path, "README.md", revision=kwargs.get("revision")), encoding="utf-8") as f:
                    pipe.model_card = f.read()
            except Exception:  # offline or no card: a fresh one is rendered on save
                pipe.model_card = None
        return pipe

    # Bounds for configs read from shared folders: far above any real model, far below what would hang the loader or
    # exhaust memory (a UNet at these limits has ~1e9 parameters).
    CONFIG_LIMITS = {"layers_per_block": 8, "levels": 8, "channels": 2048, "in_out_channels": 512, "sample_size": 4096,
                     "patch_size": 4096, "scale_factor": 100, "variables": 64, "num_train_timesteps": 100_000}
    REQUIRED_CONFIG = ("variables", "units", "transforms", "norm_mean", "norm_std", "residual_std", "static_channels",
                       "static_mean", "static_std", "scale_factor", "patch_size")

    @classmethod
    def _check_untrusted_config(cls, path, kwargs) -> None:
        """Refuse, before anything is built, a folder whose configs lack statistics or ask for absurd sizes."""
        from diffusers import UNet2DModel

        hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        index = cls.load_config(path, **hub)
        missing = [k for k in cls.REQUIRED_CONFIG if k not in index]
        if missing:
            raise ValueError(f"{path} lacks {missing} in model_index.json: the model's statistics and layout are required, "
                             "never filled with defaults.")
        lim = cls.CONFIG_LIMITS
        problems = []
        if not isinstance(index["variables"], list) or not 0 < len(index["variables"]) <= lim["variables"]:
            problems.append(f"variables {str(index['variables'])[:80]}")
        for key in ("patch_size", "scale_factor"):
            if not isinstance(index[key], int) or not 0 < index[key] <= lim[key]:
                problems.append(f"{key} {index[key]!r} (limit {lim[key]})")
        for name in ("unet", "regression_unet"):
            entry = index.get(name)
            if not (isinstance(entry, (list, tuple)) and entry and entry[0] is not None):
                continue
            c = UNet2DModel.load_config(path, subfolder=name, **hub)
            chans = c.get("block_out_channels", [])
            if not isinstance(c.get("layers_per_block"), int) or not 0 < c["layers_per_block"] <= lim["layers_per_block"]:
                problems.append(f"{name}.layers_per_block {c.get('layers_per_block')!r} (limit {lim['layers_per_block']})")
            if not 0 < len(chans) <= lim["levels"] or not all(isinstance(x, int) and 0 < x <= lim["channels"] for x in chans):
                problems.append(f"{name}.block_out_channels {str(chans)[:80]} (limit {lim['levels']} levels of {lim['channels']})")
            for key, limit in (("in_channels", lim["in_out_channels"]), ("out_channels", lim["in_out_channels"]),
                               ("sample_size", lim["sample_size"])):
                value = c.get(key)
                if value is not None and (not isinstance(value, int) or not 0 < value <= limit):
                    problems.append(f"{name}.{key} {value!r} (limit {limit})")
        sched = index.get("scheduler")
        if isinstance(sched, (list, tuple)) and sched and sched[0] is not None:
            from diffusers import DDPMScheduler

            t = DDPMScheduler.load_config(path, subfolder="scheduler", **hub).get("num_train_timesteps", 1000)
            if not isinstance(t, int) or not 0 < t <= lim["num_train_timesteps"]:
                problems.append(f"scheduler.num_train_timesteps {t!r} (limit {lim['num_train_timesteps']})")
        if problems:
            raise ValueError(f"Refusing {path}: its configs ask for sizes no downscaling model needs: {'; '.join(problems)}.")

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        push_to_hub: bool = False, **kwargs):
        """Save weights (safetensors only), configs and the model card (``README.md``: the one loaded or set
        in ``pipe.model_card``, else one rendered from the config). ``push_to_hub=True`` uploads the folder
        as :meth:`push_to_hub` does (``repo_id`` defaults to the folder name)."""
        import os

        if not safe_serialization:
            raise ValueError("dpdm-diffusers saves weights as safetensors only (safe_serialization=False would write "
                             "pickle files, which its loader refuses).")
        super().save_pretrained(save_directory, safe_serialization=True, variant=variant, push_to_hub=False)
        write_pipeline_module(save_directory)
        with open(os.path.join(save_directory, "README.md"), "w", encoding="utf-8") as f:
            f.write(self._card())
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(str(save_directory)))
            return self.push_to_hub(repo_id, variant=variant, **kwargs)

    def _card(self, repo_id: str | None = None) -> str:
        from dpdm_diffusers.model_card import PLACEHOLDER_ID, render_model_card

        card = self.model_card or self._folder_card() or render_model_card(dict(self.config), repo_id=repo_id, pipe=self)
        return card.replace(f'from_pretrained("{PLACEHOLDER_ID}")', f'from_pretrained("{repo_id}")') if repo_id else card

    def _folder_card(self) -> str | None:
        """The README.md of the folder this pipeline was loaded from (diffusers' generic loader does not keep it)."""
        import os

        folder = str(getattr(self, "name_or_path", "") or "")
        card = os.path.join(folder, "README.md")
        if folder and os.path.isdir(folder) and os.path.isfile(card):
            with open(card, encoding="utf-8") as f:
                return f.read()
        return None

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        model_card: str | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
    ):
        """Save the pipeline (safetensors) with its model card and upload it to the Hub as ``repo_id``.

        ``model_card`` replaces the card's Markdown; by default the pipeline's own card is used (the loaded or
        trained one, or one rendered from the config). The id is recorded in the config (``hub_id``), so
        models fine-tuned from this one name it as their base.
        """
        import tempfile

        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        self.register_to_config(hub_id=repo_id)
        if model_card is not None:
            self.model_card = model_card
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant)
            with open(f"{tmp}/README.md", "w", encoding="utf-8") as f:
                f.write(self._card(repo_id))
            return upload_folder(
                repo_id=repo_id, folder_path=tmp, token=token, create_pr=create_pr,
                commit_message=commit_message or "Upload DownscalingPipeline",
            )

    def regression_pipeline(self) -> "DownscalingPipeline":
        """The deterministic first stage of a two-stage pipeline as a pipeline of its own (shares weights)."""
        if self.regression_unet is None:
            raise ValueError("This pipeline has no regression_unet (it is not a two-stage model).")
        config = {k: v for k, v in self.config.items() if not k.startswith("_") and k not in self.components}
        config.update(objective="regression", stochastic_std=None)
        pipe = DownscalingPipeline(unet=self.regression_unet, scheduler=self.scheduler, **config)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    # ------------------------------------------------------------------------------------------
    # input handling
    # ------------------------------------------------------------------------------------------
    def _prepare(self, low_res, static_fields, target_grid, member_dim, nan_policy, variable_map=None) -> _Prepared:
        cfg = self.config
        variables = list(cfg.variables)
        if isinstance(low_res, (torch.Tensor, np.ndarray)):
            values = low_res.detach().cpu().numpy() if isinstance(low_res, torch.Tensor) else np.asarray(low_res)
            if values.ndim == 3:
                values = values[None]
            if values.ndim != 4 or values.shape[1] != len(variables):
                raise ValueError(
                    f"Array input must be (batch, {len(variables)} variables, lat, lon) for variables {variables}, "
                    f"got shape {values.shape}."
                )
            h, w = values.shape[-2:]
            # index coordinates: a coarse cell i covers fine cells i*s .. i*s + s - 1
            src = Grid(np.arange(h, dtype=float), np.arange(w, dtype=float))
            meta = {"kind": "array", "tensor": isinstance(low_res, torch.Tensor),
                    "sample_keys": [f"#{b}" for b in range(values.shape[0])]}  # arrays carry no coordinates: by position
        else:
            values, src, meta = self._from_xarray(low_res, variables, member_dim, variable_map)
        values = values.astype(np.float32, copy=False)

        n_nan = int(np.isnan(values).sum())
        if n_nan and nan_policy == "raise":
            raise ValueError(
                f"The low-res input contains {n_nan} NaN values. Fill them, or pass nan_policy='mask' to "
                "get NaN wherever the interpolated input is undefined."
            )
        if not np.all(np.isfinite(values[~np.isnan(values)])):
            raise ValueError("The low-res input contains infinite values.")

        if target_grid is None:
            dst = src.refine(cfg.scale_factor)
        else:
            dst = target_grid if isinstance(target_grid, Grid) else Grid.from_xarray(target_grid)
            dst = Grid(np.sort(dst.lat), np.sort(dst.lon))
            ratio = src.scale_factor_to(dst)
            if abs(ratio - cfg.scale_factor) > 0.05 * cfg.scale_factor:
                raise ValueError(
                    f"Wrong scale factor: the target grid is {ratio:.3g}x finer than the low-res grid, but this "
                    f"model was trained for {cfg.scale_factor}x (low-res spacing {src.dlat:.4g}, target {dst.dlat:.4g})."
                )
        static = self._resolve_static(static_fields, dst, meta)
        return _Prepared(values=values, src=src, dst=dst, static=static, meta=meta)

    def _from_xarray(self, low_res, variables, member_dim, variable_map=None):
        import xarray as xr

        from dpdm_diffusers.units import convert_units

        if isinstance(low_res, xr.DataArray):
            name = low_res.name
            if name is None and len(variables) == 1:
                name = variables[0]
            if (variable_map or {}).get(name, name) not in variables or len(variables) != 1:
                raise ValueError(
                    f"DataArray input is named {low_res.name!r}, but this model downscales {variables}; "
                    "pass a Dataset with exactly these variables, rename the DataArray, or pass "
                    f"variable_map={{{low_res.name!r}: {variables[0]!r}}}."
                )
            ds, kind = low_res.rename(name).to_dataset(), "dataarray"
        elif isinstance(low_res, xr.Dataset):
            ds, kind = low_res, "dataset"
        else:
            raise TypeError(f"low_res must be an xarray Dataset/DataArray, a torch.Tensor or a numpy array, got {type(low_res)}.")
        variable_map = dict(variable_map or {})
        unknown = [k for k in variable_map if k not in ds.data_vars]
        if unknown:
            raise ValueError(f"variable_map names {unknown}, which the input does not hold ({sorted(map(str, ds.data_vars))}).")
        ds = ds.rename(variable_map)
        missing = [v for v in variables if v not in ds.data_vars]
        extra = [v for v in ds.data_vars if v not in variables]
        if missing or extra:
            from dpdm_diffusers.data import mapping_hint

            hint = mapping_hint(missing, [str(v) for v in extra]) or f" Select them with ds[{variables}]."
            raise ValueError(
                f"Variables do not match the model: missing {missing}, unexpected {extra}; the model expects "
                f"{variables}.{hint}"
            )
        lat_name, lon_name = lat_lon_names(ds)
        for name in (lat_name, lon_name):  # a dim without values would silently read as 0, 1, 2 ... degrees
            if name not in ds.coords:
                raise ValueError(f"Dimension {name!r} has no coordinate values: not a lat/lon grid (assign degrees first).")
        if np.nanmax(np.abs(np.asarray(ds[lat_name].values, dtype=float))) > 90:
            raise ValueError(f"{lat_name!r} reaches {np.nanmax(np.abs(ds[lat_name].values)):.4g}: not a lat/lon grid "
                             "(projected x/y coordinates?); regrid to a regular lat/lon grid first.")
        ds = self._contiguous_longitude(ds, lat_name, lon_name)
        src_in = Grid(ds[lat_name].values, ds[lon_name].values)  # validates monotonic/unique/regular
        lat_desc, lon_desc = src_in.lat[0] > src_in.lat[-1], src_in.lon[0] > src_in.lon[-1]
        ds = ds.sortby([lat_name, lon_name])
        src = Grid(ds[lat_name].values, ds[lon_name].values)
        lon_base = None
        if src.periodic:
            # one canonical longitude order (0..360) for global fields, so the tiling and the noise canvas sit at the
            # same places whatever the caller's convention (-180..180 or 0..360); output is given back in theirs
            lon_base = float(src.lon.min() - src.dlon / 2)
            ds = ds.assign_coords({lon_name: np.mod(ds[lon_name].values, 360.0)}).sortby(lon_name)
            src = Grid(ds[lat_name].values, ds[lon_name].values)
        dims0 = ds[variables[0]].dims
        batch_dims = [d for d in dims0 if d not in (lat_name, lon_name)]
        empty = [d for d in batch_dims if ds.sizes[d] == 0]
        if empty:
            raise ValueError(f"The input's {empty} dimension is empty: nothing to downscale.")
        if member_dim in batch_dims:
            raise ValueError(
                f"The input already has a {member_dim!r} dimension; rename it (e.g. ds.rename({member_dim}='realization')) "
                "or pass member_dim='ensemble'."
            )
        arrays = []
        for v, u in zip(variables, self.config.units):
            da = ds[v]
            if set(da.dims) != set(dims0):
                raise ValueError(f"Variable {v!r} has dims {da.dims}, unlike {variables[0]!r} with {dims0}.")
            if da.dtype == bool or not np.issubdtype(da.dtype, np.number) or np.issubdtype(da.dtype, np.complexfloating):
                raise TypeError(f"Variable {v!r} has dtype {da.dtype}; a real-valued numeric field is needed.")
            # units are required; compatible ones (degC for K, hPa for Pa) are converted by pint
            da = convert_units(da, u, v)
            arrays.append(da.transpose(*batch_dims, lat_name, lon_name).values)
        values = np.stack(arrays, axis=-3)  # (*batch, V, h, w)
        batch_shape = values.shape[:-3]
        values = values.reshape(-1, *values.shape[-3:])
        meta = {
            "lon_base": lon_base,
            "sample_keys": sample_keys(ds, batch_dims),
            "rename_back": {b: a for a, b in variable_map.items()},
            "kind": kind, "ds": ds, "lat": lat_name, "lon": lon_name, "batch_dims": batch_dims,
            "batch_shape": batch_shape, "lat_desc": lat_desc, "lon_desc": lon_desc,
        }
        return values, src, meta

    @staticmethod
    def _contiguous_longitude(ds, lat_name, lon_name):
        """A region across the dateline given in -180..180 (or across Greenwich in 0..360) is a regular grid in the
        other convention: use that (the output's longitudes are then continuous, e.g. 170..190) instead of refusing."""
        import xarray as xr

        try:
            Grid(np.sort(ds[lat_name].values), np.sort(ds[lon_name].values))
            return ds
        except ValueError as err:
            first = err
        lon = np.asarray(ds[lon_name].values, dtype=np.float64)
        for shifted in (np.mod(lon, 360.0), (lon + 180.0) % 360.0 - 180.0):
            try:
                Grid(np.sort(ds[lat_name].values), np.sort(shifted))
            except ValueError:
                continue
            return ds.assign_coords({lon_name: xr.Variable(lon_name, shifted, ds[lon_name].attrs)}).sortby(lon_name)
        raise first

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
        except Exception:  # no way to tell: do not guess
            return
        if need > free:
            raise MemoryError(
                f"This call needs about {need / 2**30:.1f} GiB ({rows} member x sample canvases of {height} x {width} "
                f"points) but {free / 2**30:.1f} GiB are free on {device}. Use fewer members or time steps per call, a "
                "smaller domain, or `dpdm downscale`, which streams a record a few time steps at a time.")

    def _resolve_static(self, static_fields, dst: Grid, meta) -> np.ndarray | None:
        names = list(self.config.static_channels)
        if not names:
            return None
        if static_fields is None:
            if meta["kind"] == "array":
                raise ValueError(f"Array input needs the static fields {names} passed explicitly (no coordinates).")
            try:
                from dpdm_diffusers.static_fields import get_static_fields
            except ImportError as err:  # pragma: no cover - depends on the optional extra
                raise ImportError(
                    f"This model needs static fields {names}: pass them, or install `dpdm-diffusers[data]` so they "
                    "are derived from packaged global topography and land-sea mask."
                ) from err
            static_fields = get_static_fields(dst, names)
        if isinstance(static_fields, (torch.Tensor, np.ndarray)):
            arr = static_fields.detach().cpu().numpy() if isinstance(static_fields, torch.Tensor) else np.asarray(static_fields)
            if arr.shape != (len(names), *dst.shape):
                raise ValueError(f"Static array must have shape {(len(names), *dst.shape)} for {names}, got {arr.shape}.")
            return arr.astype(np.float32)
        missing = [n for n in names if n not in static_fields]
        if missing:
            raise ValueError(f"Static fields {missing} are missing; the model needs {names}.")
        out = []
        for n in names:
            f = static_fields[n]
            if isinstance(f, (torch.Tensor, np.ndarray)):
                arr = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
                if arr.shape != dst.shape:
                    raise ValueError(f"Static field {n!r} has shape {arr.shape}, the target grid is {dst.shape}.")
            else:  # xarray on its own grid: must be the target grid
                la, lo = lat_lon_names(f)
                f = f.sortby([la, lo]).squeeze(drop=True)
                lat, lon = f[la].values, f[lo].values
                same = lat.shape == dst.lat.shape and lon.shape == dst.lon.shape
                tol = 1e-3 * min(dst.dlat, dst.dlon)
                if same:
                    # match columns modulo 360 (the field may be in the other longitude convention or order)
                    gap = np.abs((lon[None, :] - dst.lon[:, None] + 180.0) % 360.0 - 180.0)
                    cols = gap.argmin(axis=1)
                    same = np.allclose(lat, dst.lat, atol=tol) and bool(np.all(gap[np.arange(cols.size), cols] < tol))
                    f = f.isel({lo: cols})
                if not same:
                    raise ValueError(
                        f"Static field {n!r} is on a {lat.size}x{lon.size} grid (lat {lat.min():.3f}..{lat.max():.3f}, "
                        f"lon {lon.min():.3f}..{lon.max():.3f}) but the target grid is {dst.shape[0]}x{dst.shape[1]} "
                        f"(lat {dst.lat.min():.3f}..{dst.lat.max():.3f}, lon {dst.lon.min():.3f}..{dst.lon.max():.3f})."
                    )
                arr = f.transpose(la, lo).values
            if not np.isfinite(arr).all():
                raise ValueError(f"Static field {n!r} contains NaN or inf; fill it (e.g. 0 m over the ocean).")
            out.append(arr.astype(np.float32))
        return np.stack(out)

    def _check_range(self, values: np.ndarray, max_std: float = 10.0) -> None:
        """Refuse inputs more than ``max_std`` training standard deviations from the training mean (after the
        variable's transform): wrong units (degC labelled K) or corrupt values, never a silent wrong answer."""
        from dpdm_diffusers.transforms import forward_transform

        cfg = self.config
        for i, (v, u, t) in enumerate(zip(cfg.variables, cfg.units, cfg.transforms)):
            x = values[:, i]
            if not np.isfinite(x).any():
                continue
            z = (forward_transform(torch.from_numpy(np.nan_to_num(x[np.isfinite(x)])), t).numpy() - cfg.norm_mean[i]) / cfg.norm_std[i]
            if np.abs(z).max() > max_std:
                lo, hi = np.nanmin(x), np.nanmax(x)
                raise ValueError(
                    f"Variable {v!r} spans {lo:.4g} .. {hi:.4g} {u}, more than {max_std:g} standard deviations from what the "
                    f"model was trained on (mean {cfg.norm_mean[i]:.4g}, std {cfg.norm_std[i]:.4g} {u if t == 'identity' else f'({t})'}). "
                    "Wrong units or corrupt values?")

    def _conserve(self, members: torch.Tensor, prep: _Prepared) -> torch.Tensor:
        """Members ``(M, B, V, H, W)`` whose block means equal the low-res input (see ``conserve`` in ``__call__``)."""
        from dpdm_diffusers.conservation import conserve

        s = self.config.scale_factor
        refined = prep.src.refine(s)
        if refined.shape != prep.dst.shape or not (np.allclose(refined.lat, prep.dst.lat) and np.allclose(refined.lon, prep.dst.lon)):
            raise ValueError("conserve=True needs the default target grid (the low-res grid refined by scale_factor): "
                             "only then is each coarse cell the block mean of its fine cells.")
        low = torch.from_numpy(prep.values)
        out = members.clone()
        for i, t in enumerate(self.config.transforms):
            method = "additive" if t == "identity" else "multiplicative"
            out[:, :, i] = conserve(members[:, :, i : i + 1], low[:, i : i + 1], s, method=method)[:, :, 0]
        return out

    @staticmethod
    def _member_seeds(generator, num_members: int) -> list[int]:
        """One seed per member, drawn one at a time so member k never depends on ``num_members``."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != num_members:
                raise ValueError(f"Got {len(generator)} generators for {num_members} members; pass one or exactly num_members.")
            return [int(torch.randint(0, 2**62, (1,), generator=g).item()) for g in generator]
        return [int(torch.randint(0, 2**62, (1,), generator=generator).item()) for _ in range(num_members)]

    @staticmethod
    def _fused_unet(model, canvas, t, tiler, cond_tiles, num_batch, batch_size, autocast_dtype=None):
        """One UNet evaluation of every row of ``canvas`` (rows = member-major ``k * B + b``): all
        (row, tile) pairs go through ``model`` in batches of ``batch_size`` and are fused back into one
        canvas with the tiler's window."""
        num_rows, n_tiles = canvas.shape[0], tiler.num_tiles
        pair_rows = torch.arange(num_rows).repeat_interleave(n_tiles)
        pair_tiles = torch.arange(n_tiles).repeat(num_rows)
        pair_cond = (pair_rows % num_batch) * n_tiles + pair_tiles  # index into cond_tiles (b * N + tile)
        acc = torch.zeros(num_rows, model.config.out_channels, canvas.shape[-2] * canvas.shape[-1], device=canvas.device)
        for start in range(0, len(pair_rows), batch_size):
            rows = pair_rows[start : start + batch_size]
            tiles = pair_tiles[start : start + batch_size]
            x = tiler.extract(canvas, rows, tiles)
            inp = torch.cat([x, cond_tiles[pair_cond[start : start + batch_size].to(canvas.device)]], dim=1)
            if autocast_dtype is not None:  # reduced-precision arithmetic, float32 weights and sampler state
                with torch.autocast(canvas.device.type, dtype=autocast_dtype):
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

    # ------------------------------------------------------------------------------------------
    # output handling
    # ------------------------------------------------------------------------------------------
    def _to_xarray(self, members: np.ndarray, prep: _Prepared, member_dim: str, info: dict):
        import xarray as xr

        meta, cfg = prep.meta, self.config
        ds_in, lat_name, lon_name = meta["ds"], meta["lat"], meta["lon"]
        batch_dims, batch_shape = meta["batch_dims"], meta["batch_shape"]
        m = members.shape[0]
        members = members.reshape(m, *batch_shape, *members.shape[-3:])  # (M, *batch, V, H, W)
        coords = {
            lat_name: xr.Variable(lat_name, prep.dst.lat, ds_in[lat_name].attrs),
            lon_name: xr.Variable(lon_name, prep.dst.lon, ds_in[lon_name].attrs),
            member_dim: xr.Variable(member_dim, np.arange(m), {"long_name": "ensemble member"}),
        }
        for name, c in ds_in.coords.items():  # time, scalar and other non-spatial coords carry through
            if name not in (lat_name, lon_name) and not ({lat_name, lon_name} & set(c.dims)):
                coords[name] = c
        history = ds_in.attrs.get("history", "")
        stamp = f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ} downscaled x{cfg.scale_factor} by dpdm-diffusers {__version__}"
        attrs = dict(ds_in.attrs)
        attrs.update(
            Conventions="CF-1.8",
            source=f"dpdm-diffusers {__version__} DownscalingPipeline",
            history=f"{history}\n{stamp}".strip(),
            **{f"dpdm_{k}": v for k, v in info.items()},
        )

        def dataset(arr, dims_lead, cell_method, long_suffix):
            data_vars = {}
            for i, (v, u) in enumerate(zip(cfg.variables, cfg.units)):
                va = dict(ds_in[v].attrs)
                va["units"] = u
                if cell_method:
                    va["cell_methods"] = f"{member_dim}: {cell_method}"
                if long_suffix:
                    va["long_name"] = f"{va.get('long_name', v)} {long_suffix}".strip()
                data_vars[v] = xr.Variable((*dims_lead, *batch_dims, lat_name, lon_name), arr[..., i, :, :], va)
            keep = {k: c for k, c in coords.items() if k != member_dim or dims_lead}
            out = xr.Dataset(data_vars, coords=keep, attrs=attrs)
            # give the caller back their own longitude convention and latitude/longitude order
            if meta.get("lon_base") is not None:
                base = meta["lon_base"]
                theirs = base + np.mod(out[lon_name].values - base, 360.0)
                out = out.assign_coords({lon_name: xr.Variable(lon_name, theirs, out[lon_name].attrs)}).sortby(lon_name)
            if meta["lat_desc"]:
                out = out.isel({lat_name: slice(None, None, -1)})
            if meta["lon_desc"]:
                out = out.isel({lon_name: slice(None, None, -1)})
            out = out.rename(meta["rename_back"]) if meta["rename_back"] else out
            return out[list(out.data_vars)[0]] if meta["kind"] == "dataarray" else out

        mean = members.mean(axis=0)
        std = members.std(axis=0, ddof=1) if m > 1 else np.zeros_like(mean)
        return (
            dataset(members, (member_dim,), None, None),
            dataset(mean, (), "mean", "ensemble mean"),
            dataset(std, (), "standard_deviation", "ensemble spread"),
        )

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
                whatever ``num_members`` (> k), ``batch_size``, tiling, or the other samples in the call: its noise is
                keyed by the sample's coordinate values (e.g. its time stamp), so a record split into chunks, processes
                or resumed runs gives the same members. A list gives one generator per member.
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
                (non-negative) ones. Needs the default target grid (the low-res grid refined).
            latents (`torch.Tensor`, *optional*): the initial noise in model space, ``(num_members * batch, V, H, W)``
                or ``(num_members, batch, V, H, W)``, members major, on the canvas (the target grid, padded to at
                least one patch: ``max(H, patch_size)``). Unscaled unit Gaussian, as diffusers' ``prepare_latents``
                takes it; replaces the generator's noise (members are then those of your latents).
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called as
                ``callback_on_step_end(pipe, step, timestep, callback_kwargs)`` after every denoising step with
                the tensors named in ``callback_on_step_end_tensor_inputs``; a returned ``{"latents": ...}`` replaces
                the running latents (model space, rows member-major). Set ``pipe._interrupt = True`` to stop early.
            callback_on_step_end_tensor_inputs (`Sequence[str]`, defaults to ``("latents",)``): tensors passed to the
                callback, from ``pipe._callback_tensor_inputs`` (``latents``, ``model_output``).
            batch_size (`int`, *optional*): deprecated name of ``tiles_per_call`` (in diffusers ``batch_size``
                counts samples; here it never did: use ``num_members`` for more samples).

        Examples:

        Returns:
            [`DownscalingPipelineOutput`] or `tuple` ``(members, mean, std)`` in physical units. With
            ``output_type="latent"``: the final model-space latents ``(num_members, batch, V, H, W)`` as ``members``
            (a torch tensor on the target grid, before de-normalisation and the interpolated input are added
            back), their mean and std.
        """
        # 1. Check arguments
        for name, value in (("num_members", num_members), ("num_inference_steps", num_inference_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {value!r}.")
        if num_members < 1:
            raise ValueError(f"num_members must be >= 1, got {num_members}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
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
        if isinstance(tiles_per_call, bool) or not isinstance(tiles_per_call, (int, np.integer)) or tiles_per_call < 1:
            raise ValueError(f"tiles_per_call must be a positive integer, got {tiles_per_call!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not among {self._callback_tensor_inputs}.")
        if _is_edm(self.scheduler):
            raise ValueError(
                f"{type(self.scheduler).__name__} preconditions inputs and outputs for EDM-trained networks (sigma_data, "
                "c_skip, c_out); this model is a DDPM eps-prediction network, so its samples would be meaningless. Use "
                "e.g. EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True).")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"Unknown nan_policy {nan_policy!r}; expected one of {NAN_POLICIES}.")
        if output_type is not None and output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}.")
        sched_cfg = self.scheduler.config
        narrow_clip = getattr(sched_cfg, "clip_sample", False) and getattr(sched_cfg, "clip_sample_range", 1.0) < MIN_CLIP_RANGE
        if narrow_clip or getattr(sched_cfg, "thresholding", False):
            raise ValueError(
                f"The scheduler clips (clip_sample=True, clip_sample_range={getattr(sched_cfg, 'clip_sample_range', None)}) "
                "or thresholds samples, which distorts standardised climate data; build it with clip_sample=False, "
                "e.g. DDIMScheduler.from_config(pipe.scheduler.config), or with a wide clip_sample_range >= "
                f"{MIN_CLIP_RANGE:g} (model-space standard deviations) that only guards against blow-ups."
            )
        if topography is not None or land_sea_mask is not None:
            if static_fields is not None:
                raise ValueError("Pass static fields either as static_fields or as topography/land_sea_mask, not both.")
            static_fields = {k: f for k, f in (("topography", topography), ("land_sea_mask", land_sea_mask)) if f is not None}

        # 2. Canonical inputs: values (B, V, h, w), ascending grids, static fields on the target grid
        prep = self._prepare(low_res, static_fields, target_grid, member_dim, nan_policy, variable_map)
        if output_type is None:
            output_type = "xarray" if prep.meta["kind"] != "array" else ("pt" if prep.meta["tensor"] else "np")
        if output_type == "xarray" and prep.meta["kind"] == "array":
            raise ValueError("output_type='xarray' needs xarray input (arrays carry no coordinates).")
        device = self._execution_device
        cfg, norm = self.config, self.normalizer
        patch = cfg.patch_size
        self._check_range(prep.values)

        # 3. Condition = [normalised interpolated low-res, normalised static fields]
        lerp = interpolate(prep.values, prep.src, prep.dst, cfg.interpolation)  # (B, V, H, W) physical
        invalid = None
        if nan_policy == "mask" and np.isnan(prep.values).any():
            # bilinear stencil tells where the input is undefined; fill with the mean for the network
            invalid = np.isnan(interpolate(prep.values, prep.src, prep.dst, "bilinear")) | np.isnan(lerp)
        lerp_t = torch.from_numpy(np.ascontiguousarray(lerp)).float()
        static_t = torch.from_numpy(prep.static) if prep.static is not None else None
        # NaN (masked mode only) becomes the variable's mean (0 once normalised); those points are re-masked
        cond = torch.nan_to_num(norm.condition(lerp_t, static_t), nan=0.0)  # (B, V+S, H, W)
        lerp_norm = cond[:, : norm.num_variables]

        # 4. Pad small domains to one patch (wrap on global longitude) and tile the canvas
        num_batch, (height, width) = cond.shape[0], prep.dst.shape
        periodic = prep.src.periodic and prep.meta["kind"] != "array"
        pad_h, pad_w = max(0, patch - height), max(0, patch - width)
        if pad_h or pad_w:
            cond = torch.nn.functional.pad(cond, (0, pad_w, 0, 0), mode="circular" if periodic else "replicate")
            cond = torch.nn.functional.pad(cond, (0, 0, 0, pad_h), mode="replicate")
        canvas_h, canvas_w = cond.shape[-2:]
        tiler = PatchTiler(canvas_h, canvas_w, patch, tile_overlap, periodic_x=periodic and not pad_w)
        n_tiles = tiler.num_tiles
        cond = cond.to(device)
        cond_tiles = tiler.extract(
            cond, torch.arange(num_batch).repeat_interleave(n_tiles), torch.arange(n_tiles).repeat(num_batch)
        )  # (B * N, C, P, P), index b * N + tile

        # 5. Initial noise: one generator stream per (member, sample) row, seeded by the member's seed and the
        #    sample's *key* (its coordinate values, e.g. the time stamp), never its position in the call: a member
        #    of a given time step is the same field whatever batch, chunk, process, batch_size or tiling produced
        #    it. Rows are member-major: row = k * B + b.
        seeds = self._member_seeds(generator, num_members)
        if cfg.objective == "regression":
            seeds = seeds[:1]  # every member of a deterministic model is the same field: compute it once
        num_vars = self.unet.config.out_channels
        self._check_memory(len(seeds) * num_batch, 2 * num_vars + norm.num_static, canvas_h, canvas_w, device)
        row_gens = [torch.Generator().manual_seed(noise_seed(s, key)) for s in seeds for key in prep.meta["sample_keys"]]
        if latents is None:
            latents = torch.cat([torch.randn((1, num_vars, canvas_h, canvas_w), generator=g) for g in row_gens])
        else:
            expected = (num_members * num_batch, num_vars, canvas_h, canvas_w)
            if tuple(latents.shape) == (num_members, num_batch, num_vars, canvas_h, canvas_w):
                latents = latents.reshape(expected)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {expected} (members x batch, variables, canvas) or "
                                 f"{(num_members, num_batch, num_vars, canvas_h, canvas_w)}, got {tuple(latents.shape)}.")
            latents = latents.detach().float().cpu()[: len(seeds) * num_batch]
        regression = cfg.objective == "regression"
        if regression:  # deterministic baseline: a single pass on zero noise at t = 0
            latents = torch.zeros_like(latents)
            timesteps = torch.zeros(1, dtype=torch.long, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            latents = latents * self.scheduler.init_noise_sigma
            timesteps = self.scheduler.timesteps
            alphas = getattr(self.scheduler, "alphas_cumprod", None)
            if alphas is not None and float(alphas[int(timesteps[0])]) < 1e-6 and not getattr(sched_cfg, "clip_sample", False):
                logger.warning(
                    "The sampler starts at t=%d where alpha_bar=%.1e: its x0 estimate divides the eps error by %.0e and "
                    "can blow up. Build samplers from the model's own config (Cls.from_config(pipe.scheduler.config)), whose "
                    "schedule ends at t=959 (modeling.NUM_TRAIN_TIMESTEPS), or use a wide clip_sample_range.",
                    int(timesteps[0]), float(alphas[int(timesteps[0])]), float(alphas[int(timesteps[0])]) ** 0.5,
                )
        latents = latents.to(device)
        extra_step_kwargs = self._extra_step_kwargs(row_gens, eta)

        # 6. Two-stage models: the regression UNet's mean, once per batch entry (one pass at t = 0)
        fused = dict(tiler=tiler, cond_tiles=cond_tiles, num_batch=num_batch, batch_size=tiles_per_call,
                     autocast_dtype=self.autocast_dtype)
        regression_mean = None
        if self.regression_unet is not None and not regression:
            zero = torch.zeros(num_batch, num_vars, canvas_h, canvas_w, device=device)
            regression_mean = self._fused_unet(self.regression_unet, zero, torch.zeros(1, dtype=torch.long, device=device), **fused)

        # 7. Denoising loop: all tiles of all rows through the UNet in batches, fused on the canvas at every
        #    step, then one scheduler.step for the whole canvas (multistep solvers keep one history)
        #    The bar counts inference steps: second-order samplers (Heun, KDPM2) take `order` timesteps per step.
        self._num_timesteps, self._interrupt = len(timesteps), False
        order = 1 if regression else getattr(self.scheduler, "order", 1)
        num_steps = 1 if regression else num_inference_steps
        num_warmup_steps = len(timesteps) - num_steps * order
        with self.progress_bar(total=num_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_in = latents if regression else self.scheduler.scale_model_input(latents, t)
                model_output = self._fused_unet(self.unet, model_in, t, **fused)
                if regression:
                    latents = model_output
                else:
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

        # 8. Back to physical units on the target grid
        latents = latents[..., :height, :width].float().cpu()
        if output_type == "latent":
            self.maybe_free_model_hooks()
            lat = latents.reshape(len(seeds), num_batch, num_vars, height, width).expand(num_members, -1, -1, -1, -1)
            lat = lat.contiguous()
            std = lat.std(0, unbiased=True) if num_members > 1 else torch.zeros_like(lat[0])
            out = (lat, lat.mean(0), std)
            return DownscalingPipelineOutput(*out) if return_dict else out
        lerp_norm_rows = lerp_norm.repeat(len(seeds), 1, 1, 1)
        members = norm.from_model_space(latents, lerp_norm_rows)
        members = members.reshape(len(seeds), num_batch, num_vars, height, width)
        members = members.expand(num_members, -1, -1, -1, -1).contiguous()
        expected_gaps = torch.from_numpy(invalid)[None] if invalid is not None else torch.zeros((), dtype=torch.bool)
        if not bool((torch.isfinite(members) | expected_gaps).all()):  # e.g. NaN weights: never an unexplained NaN
            raise FloatingPointError("The model produced non-finite values (NaN or inf weights, or a diverging sampler); "
                                     "nothing is returned.")
        if conserve:
            members = self._conserve(members, prep)
        if invalid is not None:
            members = members.masked_fill(torch.from_numpy(invalid)[None], float("nan"))
        self.maybe_free_model_hooks()

        # 9. Package
        if output_type == "xarray":
            info = {
                "objective": cfg.objective + (" (regression mean + residual diffusion)" if regression_mean is not None else ""),
                "scheduler": "none" if regression else type(self.scheduler).__name__,
                "num_inference_steps": 1 if regression else num_inference_steps,
                "num_members": num_members, "model": str(getattr(self, "name_or_path", "") or ""),
                "scale_factor": cfg.scale_factor, "patch_size": patch, "conserve": int(conserve),
            }
            out = self._to_xarray(members.numpy(), prep, member_dim, info)
        else:
            mean = members.mean(0)
            std = members.std(0, unbiased=True) if num_members > 1 else torch.zeros_like(mean)
            out = (members, mean, std)
            if output_type == "np":
                out = tuple(o.numpy() for o in out)
        if not return_dict:
            return out
        return DownscalingPipelineOutput(members=out[0], mean=out[1], std=out[2])
