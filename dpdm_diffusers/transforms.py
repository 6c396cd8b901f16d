"""Physical units <-> model space, shared by the pipeline, training and evaluation.

Everything here is pure array math with no I/O, so the pipeline, the training script and the statistics
(:mod:`dpdm_diffusers.statistics`, on lazy xarray data) compute the model target in exactly the same way. The spaces are:

* physical: what the user sees (K, m/s, mm/day, ...);
* transformed: ``identity``, or for non-negative heavy-tailed fields (precipitation) ``log1p`` or ``sqrt``, per
  variable (benchmarks/results/tigge_five_variables.md compares the two on precipitation);
* normalised: ``(transformed - mean) / std`` with *per-variable* statistics (not per grid point, so
  a model transfers to grids and regions it was not trained on);
* model space: what the diffusion model generates. With ``prediction="residual"`` it is
  ``(normalised(high_res) - normalised(interpolated_low_res)) / residual_std``; with ``"full"`` it is
  ``normalised(high_res)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

TRANSFORMS = ("identity", "log1p", "sqrt")
# transforms of non-negative fields: their output is clipped at zero and conserved multiplicatively
NON_NEGATIVE_TRANSFORMS = ("log1p", "sqrt")
PREDICTIONS = ("residual", "full")


def forward_transform(x, name: str):
    """Apply a named per-variable transform (physical -> transformed).

    ``x``: a torch tensor, or a numpy, dask or xarray array (lazy stays lazy); the result is of the same kind.
    """
    if name == "identity":
        return x
    if name == "log1p":
        # tiny negative values from regridding must not produce NaN
        if isinstance(x, torch.Tensor):
            return torch.log1p(x.clamp_min(0))
        return np.log1p(np.maximum(x, 0))  # numpy, dask and xarray: ufuncs keep lazy data lazy
    if name == "sqrt":
        if isinstance(x, torch.Tensor):
            return torch.sqrt(x.clamp_min(0))
        return np.sqrt(np.maximum(x, 0))
    raise ValueError(f"Unknown transform {name!r}; expected one of {TRANSFORMS}.")


def inverse_transform(x: torch.Tensor, name: str) -> torch.Tensor:
    """Invert a named transform (transformed -> physical). Non-negative transforms' output is clipped to >= 0."""
    if name == "identity":
        return x
    if name == "log1p":
        return torch.expm1(x).clamp_min(0)
    if name == "sqrt":  # a negative transformed value is "drier than dry": zero, not its square
        return x.clamp_min(0).square()
    raise ValueError(f"Unknown transform {name!r}; expected one of {TRANSFORMS}.")


@dataclass
class Normalizer:
    """Per-variable statistics and the maps between physical units and model space.

    Tensors have the channel axis at ``dim=-3`` (``(..., C, H, W)``), variables in config order.
    """

    variables: Sequence[str]
    transforms: Sequence[str]
    mean: Sequence[float]
    std: Sequence[float]
    residual_std: Sequence[float] = field(default_factory=list)
    static_channels: Sequence[str] = ()
    static_mean: Sequence[float] = ()
    static_std: Sequence[float] = ()
    prediction: str = "residual"

    def __post_init__(self):
        v = len(self.variables)
        if not self.residual_std:
            self.residual_std = [1.0] * v
        for name in ("transforms", "mean", "std", "residual_std"):
            if len(getattr(self, name)) != v:
                raise ValueError(f"`{name}` has {len(getattr(self, name))} entries for {v} variables {list(self.variables)}.")
        s = len(self.static_channels)
        for name in ("static_mean", "static_std"):
            if len(getattr(self, name)) != s:
                raise ValueError(f"`{name}` has {len(getattr(self, name))} entries for {s} static channels.")
        for t in self.transforms:
            if t not in TRANSFORMS:
                raise ValueError(f"Unknown transform {t!r}; expected one of {TRANSFORMS}.")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"Unknown prediction target {self.prediction!r}; expected one of {PREDICTIONS}.")
        for name in ("std", "residual_std", "static_std"):
            if any(not float(v) > 0 for v in getattr(self, name)):
                raise ValueError(f"All `{name}` values must be > 0, got {list(getattr(self, name))}.")

    @classmethod
    def from_config(cls, config) -> Normalizer:
        """Build from a pipeline config (``pipe.config``) or any mapping with the same keys."""
        get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
        return cls(
            variables=list(get("variables")),
            transforms=list(get("transforms")),
            mean=list(get("norm_mean")),
            std=list(get("norm_std")),
            residual_std=list(get("residual_std") or []),
            static_channels=list(get("static_channels") or []),
            static_mean=list(get("static_mean") or []),
            static_std=list(get("static_std") or []),
            prediction=get("prediction", "residual"),
        )

    @property
    def num_variables(self) -> int:
        return len(self.variables)

    @property
    def num_static(self) -> int:
        return len(self.static_channels)

    @staticmethod
    def _vec(values, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(list(values), dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def _check_channels(self, x: torch.Tensor, n: int, what: str):
        if x.ndim < 3 or x.shape[-3] != n:
            raise ValueError(f"{what} must have {n} channels at dim -3, got shape {tuple(x.shape)}.")

    # physical <-> normalised ------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Physical -> normalised (transform, then per-variable standardisation)."""
        self._check_channels(x, self.num_variables, "Variables tensor")
        t = torch.stack([forward_transform(x[..., i, :, :], n) for i, n in enumerate(self.transforms)], dim=-3)
        return (t - self._vec(self.mean, t)) / self._vec(self.std, t)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised -> physical (destandardise, then inverse transform)."""
        self._check_channels(z, self.num_variables, "Variables tensor")
        t = z * self._vec(self.std, z) + self._vec(self.mean, z)
        return torch.stack([inverse_transform(t[..., i, :, :], n) for i, n in enumerate(self.transforms)], dim=-3)

    def normalize_static(self, s: torch.Tensor) -> torch.Tensor:
        self._check_channels(s, self.num_static, "Static tensor")
        if self.num_static == 0:
            return s
        return (s - self._vec(self.static_mean, s)) / self._vec(self.static_std, s)

    # model space -------------------------------------------------------------------------------
    def to_model_space(self, high_res: torch.Tensor, lerp: torch.Tensor) -> torch.Tensor:
        """Training target from physical high-res and physical interpolated low-res."""
        z = self.normalize(high_res)
        if self.prediction == "residual":
            return (z - self.normalize(lerp)) / self._vec(self.residual_std, z)
        return z

    def from_model_space(self, x: torch.Tensor, lerp_normalized: torch.Tensor) -> torch.Tensor:
        """Generated sample (model space) -> physical units, given the *normalised* interpolated input."""
        if self.prediction == "residual":
            x = lerp_normalized + x * self._vec(self.residual_std, x)
        return self.denormalize(x)

    def condition(self, lerp: torch.Tensor, static: torch.Tensor | None) -> torch.Tensor:
        """UNet conditioning channels ``[normalised lerp (V), normalised static (S)]``.

        ``lerp`` is ``(..., V, H, W)`` in physical units; ``static`` is ``(S, H, W)`` or broadcastable.
        """
        z = self.normalize(lerp)
        if self.num_static == 0:
            return z
        if static is None:
            raise ValueError(f"Static fields {list(self.static_channels)} are required by this model.")
        s = self.normalize_static(static.to(z.dtype))
        s = s.expand(*z.shape[:-3], *s.shape[-3:])
        return torch.cat([z, s], dim=-3)
