"""Training samples: model-space fields, random patch crops, and a Hugging Face ``datasets`` copy.

One job: turn (high-res, interpolated low-res, static) fields into what a training step consumes.

1. :func:`normalize_fields` maps whole fields once through :class:`~dpdm_diffusers.transforms.Normalizer`
   (the same code the pipeline uses) into :class:`NormalizedFields`: the model-space target and the
   normalised interpolated low-res, with missing values kept as NaN, plus the normalised static fields.
2. :class:`RandomPatchDataset` (a map-style ``torch.utils.data.Dataset``) draws random crops on the fly:
   longitude wraps on global grids (patches may straddle the seam), latitude never wraps. Each item is
   ``{"target", "condition", "mask", "sample", "y", "x"}`` where ``mask`` marks valid target points
   (missing values are zero-filled *and* masked, so the loss can ignore them; so are points outside the
   fields' ``loss_mask``, e.g. a spatial validation box). Crops are deterministic
   in ``(seed, epoch, index)``, which keeps DataLoader workers and distributed ranks independent.
3. :func:`build_hf_dataset` streams the normalised fields plus metadata, chunk by chunk from lazy
   xarray inputs (so they may be larger than memory), into an Arrow-backed ``datasets.Dataset``
   (memory-mapped, ``save_to_disk``/``push_to_hub``); :class:`ArrowFields` crops straight from it.

Flips are off by default. Mirroring is not a symmetry of the atmosphere (Coriolis, land-sea layout), so
it is an opt-in augmentation; when enabled, vector components change sign with the mirrored axis
(eastward wind for an east-west flip, northward wind for a north-south flip) and a wind-like variable
whose component cannot be identified is refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr

from .grids import Grid, grid_dims
from .transforms import Normalizer

if TYPE_CHECKING:  # imported lazily at run time: only the Arrow builder needs it
    import datasets

__all__ = [
    "NormalizedFields",
    "ArrowFields",
    "normalize_fields",
    "vector_components",
    "RandomPatchDataset",
    "pad_to_patch",
    "build_hf_dataset",
    "read_metadata",
]

FLIP_AXES = ("lon", "lat")
FORMAT = "dpdm-samples/1"


# ----------------------------------------------------------------------------------------------
# full fields in model space
# ----------------------------------------------------------------------------------------------
@dataclass
class NormalizedFields:
    """Whole fields in model space, held in memory as float32 arrays.

    Attributes:
        target: ``(N, V, H, W)`` model-space target (``Normalizer.to_model_space``), NaN where invalid.
        lerp: ``(N, V, H, W)`` normalised interpolated low-res (first ``V`` condition channels), NaN where missing.
        static: ``(S, H, W)`` normalised static channels (the remaining condition channels).
        normalizer: The statistics and transforms used.
        lat, lon: Grid coordinates; ``periodic`` is True on a global longitude axis.
        coords: Per-sample labels of the stacked non-spatial dims, e.g. ``{"member": [...], "time": [...]}``.
        metadata: JSON-serialisable extras (units, standard names, anything the caller adds).
        loss_mask: ``(H, W)`` bool, False where the target must not be learnt from although it is valid
            (e.g. a spatial validation box: scored, never trained on); ``None``: every valid point. The data are
            left as they are; patches mark those points invalid in their ``mask``.
    """

    target: np.ndarray
    lerp: np.ndarray
    static: np.ndarray
    normalizer: Normalizer
    lat: np.ndarray
    lon: np.ndarray
    periodic: bool
    coords: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    loss_mask: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return self.target.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.target.shape[-2], self.target.shape[-1]

    def crop(self, n: int, y0: int, x0: int, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(target, lerp, static)`` crops of sample ``n`` at row ``y0``, column ``x0`` (longitude wraps)."""
        return _crop(self.target[n], y0, x0, p), _crop(self.lerp[n], y0, x0, p), _crop(self.static, y0, x0, p)

    def to_metadata(self) -> dict[str, Any]:
        """Everything needed to rebuild this object from a stored dataset (JSON-serialisable)."""
        return _metadata(self.normalizer, self.lat, self.lon, list(self.coords), self.metadata, self.periodic)


def _metadata(normalizer: Normalizer, lat, lon, sample_dims, extra: Mapping[str, Any], periodic: bool) -> dict[str, Any]:
    nz = normalizer
    return {
        "format": FORMAT,
        "variables": list(nz.variables),
        "transforms": list(nz.transforms),
        "norm_mean": [float(v) for v in nz.mean],
        "norm_std": [float(v) for v in nz.std],
        "residual_std": [float(v) for v in nz.residual_std],
        "static_channels": list(nz.static_channels),
        "static_mean": [float(v) for v in nz.static_mean],
        "static_std": [float(v) for v in nz.static_std],
        "prediction": nz.prediction,
        "lat": [float(v) for v in lat],
        "lon": [float(v) for v in lon],
        "periodic": bool(periodic),
        "sample_dims": list(sample_dims),
        **dict(extra),
    }


def _crop(a: np.ndarray, y0: int, x0: int, p: int) -> np.ndarray:
    """``a[..., y0:y0+p, x0:x0+p]`` with the column range wrapping around the last axis."""
    w = a.shape[-1]
    if x0 + p <= w:
        return a[..., y0:y0 + p, x0:x0 + p]
    return np.concatenate([a[..., y0:y0 + p, x0:], a[..., y0:y0 + p, : x0 + p - w]], axis=-1)


def _stack_samples(ds: xr.Dataset, variables: Sequence[str]) -> tuple[xr.DataArray, list[str]]:
    """``(sample, variable, lat, lon)`` view of a Dataset (``y``/``x`` on a native grid), stacking all non-spatial dims
    into ``sample``."""
    ya, xa = grid_dims(ds)
    arr = ds[list(variables)].to_array("variable")
    extra = [str(d) for d in arr.dims if d not in ("variable", ya, xa)]
    arr = arr.transpose(*extra, "variable", ya, xa)
    if extra:
        return arr.stack(sample=extra).transpose("sample", "variable", ya, xa), extra
    return arr.expand_dims("sample"), extra


def _labels(values: np.ndarray) -> np.ndarray:
    if np.issubdtype(values.dtype, np.datetime64):
        return np.datetime_as_string(values, unit="s")
    if values.dtype == object:
        return np.array([str(v) for v in values])
    return values


@dataclass
class _Prepared:
    """Validated, stacked (still lazy) inputs shared by the in-memory and the Arrow builders."""

    high: xr.DataArray   # (sample, variable, lat, lon), physical units
    lerp: xr.DataArray
    static: np.ndarray   # (S, H, W) normalised
    coords: dict[str, np.ndarray]
    metadata: dict[str, Any]
    lat: np.ndarray
    lon: np.ndarray
    periodic: bool

    def chunks(self, normalizer: Normalizer, chunk_size: int):
        """Yield ``(start, target, lerp)`` model-space blocks of ``chunk_size`` samples (NaN = missing)."""
        n = self.high.shape[0]
        with torch.no_grad():
            for i in range(0, n, chunk_size):
                hi = np.asarray(self.high[i:i + chunk_size].values, dtype=np.float32)
                lo = np.asarray(self.lerp[i:i + chunk_size].values, dtype=np.float32)
                t = normalizer.to_model_space(torch.from_numpy(hi), torch.from_numpy(lo)).numpy()
                z = normalizer.normalize(torch.from_numpy(lo)).numpy()
                # Missing inputs must stay missing, whatever the transform does with NaN.
                bad_lo = ~np.isfinite(lo)
                t[~np.isfinite(hi) | bad_lo] = np.nan
                z[bad_lo] = np.nan
                yield i, t, z


def _prepare(high_res, lerp, normalizer: Normalizer, static, metadata) -> _Prepared:
    variables = list(normalizer.variables)
    for name, ds in (("high_res", high_res), ("lerp", lerp)):
        missing = [v for v in variables if v not in ds.data_vars]
        if missing:
            raise KeyError(f"`{name}` lacks variables {missing}; it holds {sorted(map(str, ds.data_vars))}.")
    try:
        high_res, lerp = xr.align(high_res[variables], lerp[variables], join="exact")
    except ValueError as err:
        raise ValueError(f"high_res and lerp must share coordinates (same grid and samples): {err}") from err
    h, sample_dims = _stack_samples(high_res, variables)
    l, _ = _stack_samples(lerp, variables)
    ny, nx = h.shape[-2:]

    channels = list(normalizer.static_channels)
    if channels:
        if static is None:
            raise ValueError(f"Static fields {channels} are required by this normalizer.")
        missing = [c for c in channels if c not in static.data_vars]
        if missing:
            raise KeyError(f"Static fields lack {missing}; they hold {sorted(map(str, static.data_vars))}.")
        ya, xa = grid_dims(high_res)
        sa, so = grid_dims(static)
        st = static[channels].to_array("channel").transpose("channel", sa, so)
        if st.shape[1:] != (ny, nx) or Grid.from_xarray(static).mapping != Grid.from_xarray(high_res).mapping or not (
            np.allclose(st[sa].values, high_res[ya].values)
            and np.allclose(st[so].values, high_res[xa].values)
        ):
            raise ValueError("Static fields are not on the high-res grid; build them with get_static_fields(grid).")
        with torch.no_grad():
            static_z = normalizer.normalize_static(torch.from_numpy(np.asarray(st.values, dtype=np.float32))).numpy()
        static_z = np.nan_to_num(static_z, nan=0.0)
    else:
        static_z = np.zeros((0, ny, nx), dtype=np.float32)

    coords = {}
    if sample_dims:
        index = h.indexes["sample"]
        coords = {d: _labels(np.asarray(index.get_level_values(d))) for d in sample_dims}
    meta = {
        "units": [str(high_res[v].attrs.get("units", "")) for v in variables],
        "standard_names": [str(high_res[v].attrs.get("standard_name", "")) for v in variables],
    }
    meta.update(metadata or {})
    grid = Grid.from_xarray(high_res)
    return _Prepared(high=h, lerp=l, static=static_z, coords=coords, metadata=meta, lat=grid.lat, lon=grid.lon,
                     periodic=grid.periodic)


def normalize_fields(
    high_res: xr.Dataset,
    lerp: xr.Dataset,
    normalizer: Normalizer,
    static: xr.Dataset | None = None,
    *,
    chunk_size: int = 32,
    metadata: Mapping[str, Any] | None = None,
    loss_mask: np.ndarray | None = None,
) -> NormalizedFields:
    """Map whole fields to model space once, in memory, so crops during training are plain slicing.

    ``high_res`` and ``lerp`` hold ``normalizer.variables`` on the same grid (dims ``(..., lat, lon)``;
    all non-spatial dims, e.g. ``member`` and ``time``, become the sample axis, in C order). ``static``
    holds ``normalizer.static_channels`` on that grid. Lazy inputs are computed ``chunk_size`` samples at
    a time. For data larger than memory use :func:`build_hf_dataset` and :class:`ArrowFields` instead.
    ``loss_mask`` (``(H, W)`` bool) leaves the points where it is False out of every patch's ``mask``
    (see :class:`NormalizedFields`).
    """
    prep = _prepare(high_res, lerp, normalizer, static, metadata)
    n, v, ny, nx = prep.high.shape
    if loss_mask is not None:
        loss_mask = np.asarray(loss_mask, dtype=bool)
        if loss_mask.shape != (ny, nx):
            raise ValueError(f"loss_mask has shape {loss_mask.shape}; the grid is {ny}x{nx}.")
    target = np.empty((n, v, ny, nx), dtype=np.float32)
    lerp_z = np.empty((n, v, ny, nx), dtype=np.float32)
    for i, t, z in prep.chunks(normalizer, chunk_size):
        target[i:i + len(t)] = t
        lerp_z[i:i + len(z)] = z
    return NormalizedFields(
        target=target, lerp=lerp_z, static=prep.static, normalizer=normalizer, lat=prep.lat, lon=prep.lon,
        periodic=prep.periodic, coords=prep.coords, metadata=prep.metadata, loss_mask=loss_mask,
    )


def pad_to_patch(fields: NormalizedFields, patch_size: int) -> NormalizedFields:
    """A region smaller than one patch, padded to it the way the pipeline pads at inference.

    The condition (interpolated low-res and static channels) is extended by repeating the last row/column
    at the north/east end, as ``DownscalingPipeline`` does before tiling; the target there is missing (NaN),
    so the loss and every score see the real domain only.
    """
    ny, nx = fields.shape
    ph, pw = max(0, patch_size - ny), max(0, patch_size - nx)
    if not (ph or pw):
        return fields
    if fields.periodic and pw:
        raise ValueError(f"A global grid {nx} points wide is narrower than the patch size {patch_size}.")
    width = [(0, 0)] * (fields.target.ndim - 2) + [(0, ph), (0, pw)]
    target = np.pad(fields.target, width, constant_values=np.nan)
    lerp = np.pad(fields.lerp, width, mode="edge")
    if fields.static.size:
        static = np.pad(fields.static, width[1:], mode="edge")
    else:
        static = np.zeros((0, ny + ph, nx + pw), np.float32)
    loss_mask = None if fields.loss_mask is None else np.pad(fields.loss_mask, width[-2:], constant_values=False)
    # the padded cells get coordinates continuing the grid, so the result is again a regular grid
    dlat, dlon = float(np.diff(fields.lat).mean()), float(np.diff(fields.lon).mean())
    lat = np.concatenate([fields.lat, fields.lat[-1] + dlat * np.arange(1, ph + 1)])
    lon = np.concatenate([fields.lon, fields.lon[-1] + dlon * np.arange(1, pw + 1)])
    return dataclasses.replace(fields, target=target, lerp=lerp, static=static, lat=lat, lon=lon, loss_mask=loss_mask,
                               metadata={**fields.metadata, "padded_from": [ny, nx]})


# ----------------------------------------------------------------------------------------------
# flips and vector components
# ----------------------------------------------------------------------------------------------
_EAST = re.compile(r"^(u|ua|uas|uwnd|u\d+m?|\d+m?_?u|u_?wind.*|.*u_component_of_wind.*|x_wind|eastward_.*)$", re.I)
_NORTH = re.compile(r"^(v|va|vas|vwnd|v\d+m?|\d+m?_?v|v_?wind.*|.*v_component_of_wind.*|y_wind|northward_.*)$", re.I)


def vector_components(variables: Sequence[str], standard_names: Sequence[str] | None = None) -> dict[str, str]:
    """Which variables are vector components: ``{name: "x"}`` (eastward) or ``{name: "y"}`` (northward).

    Recognised from common names (``u10``, ``v100``, ``uas``, ``10m_u_component_of_wind``...) and CF
    standard names (``eastward_wind``, ``northward_...``, ``x_wind``).
    """
    standard_names = list(standard_names or [""] * len(variables))
    out = {}
    for name, std in zip(variables, standard_names):
        if _EAST.match(str(name)) or (std and _EAST.match(std)):
            out[str(name)] = "x"
        elif _NORTH.match(str(name)) or (std and _NORTH.match(std)):
            out[str(name)] = "y"
    return out


def _looks_directional(name: str, std: str) -> bool:
    text = f"{name} {std}".lower()
    if "direction" in text:
        return True
    return any(k in text for k in ("wind", "stress", "current")) and not any(
        k in text for k in ("speed", "gust", "magnitude", "chill")
    )


# ----------------------------------------------------------------------------------------------
# random crops
# ----------------------------------------------------------------------------------------------
class RandomPatchDataset(torch.utils.data.Dataset):
    """Random ``patch_size`` crops of model-space fields, drawn on the fly.

    A target point is valid (``mask`` True) where it is finite and inside the fields' ``loss_mask``.

    Args:
        fields: :class:`NormalizedFields` (in memory) or :class:`ArrowFields` (memory-mapped Arrow).
        patch_size: Side of the square patch (the pipeline config's ``patch_size``).
        samples_per_epoch: Length of an epoch; default: enough patches to tile every field once.
        flips: Subset of ``("lon", "lat")``: mirror east-west / north-south with probability 1/2. Off by default.
        vector_components: ``{variable: "x" | "y"}`` overriding the automatic detection
            (:func:`vector_components`); used for sign handling when flipping.
        min_valid_fraction: Redraw (up to ``max_tries`` times) patches whose valid target fraction is below
            this, e.g. to skip all-ocean patches of ERA5-Land.
        max_tries: Draws per patch at most.
        seed: Base seed; item ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``.
    """

    def __init__(
        self,
        fields,
        patch_size: int,
        *,
        samples_per_epoch: int | None = None,
        flips: Sequence[str] = (),
        vector_components: Mapping[str, str] | None = None,
        min_valid_fraction: float = 0.0,
        max_tries: int = 10,
        seed: int = 0,
    ):
        self.patch_size = int(patch_size)
        ny, nx = fields.shape
        if self.patch_size <= 0:
            raise ValueError(f"Patch size must be positive, got {patch_size}.")
        if self.patch_size > min(ny, nx):
            if not isinstance(fields, NormalizedFields):
                raise ValueError(f"Patch size {patch_size} does not fit the {ny}x{nx} grid (pad small regions in "
                                 "memory: normalize_fields, not an Arrow store).")
            fields = pad_to_patch(fields, self.patch_size)
        self.fields = fields
        ny, nx = fields.shape
        self.flips = tuple(flips)
        bad = [f for f in self.flips if f not in FLIP_AXES]
        if bad:
            raise ValueError(f"Unknown flip axes {bad}; use a subset of {FLIP_AXES}.")
        nz = fields.normalizer
        self._signs = self._sign_channels(fields, vector_components) if self.flips else {}
        self._shift = {k: 2.0 * float(nz.mean[k]) / float(nz.std[k]) for ax in self._signs.values() for k in ax}
        self.min_valid_fraction = float(min_valid_fraction)
        self.max_tries = max(1, int(max_tries))
        self.seed = int(seed)
        self.epoch = 0
        tiles = int(np.ceil(ny / self.patch_size) * np.ceil(nx / self.patch_size))
        self.samples_per_epoch = int(samples_per_epoch or fields.num_samples * tiles)

    def _sign_channels(self, fields, explicit) -> dict[str, list[int]]:
        nz = fields.normalizer
        names = list(nz.variables)
        std = list(fields.metadata.get("standard_names") or [""] * len(names))
        comps = vector_components(names, std)
        comps.update(dict(explicit or {}))
        for name, s in zip(names, std):
            if name not in comps and _looks_directional(name, s):
                raise ValueError(
                    f"Refusing to flip {name!r}: it looks like a vector or direction field whose sign handling "
                    "is unknown. Pass vector_components={name: 'x' | 'y'} or disable flips."
                )
        out = {"lon": [], "lat": []}
        for name, c in comps.items():
            if name not in names:
                continue
            k = names.index(name)
            if c not in ("x", "y"):
                raise ValueError(f"Vector component of {name!r} must be 'x' or 'y', got {c!r}.")
            if nz.transforms[k] != "identity":
                raise ValueError(f"Vector component {name!r} must use the identity transform to change sign.")
            out["lon" if c == "x" else "lat"].append(k)
        return out

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh set of crops (Accelerate and the training loop call this each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _draw(self, rng: np.random.Generator) -> tuple[int, int, int]:
        ny, nx = self.fields.shape
        p = self.patch_size
        n = int(rng.integers(self.fields.num_samples))
        y0 = int(rng.integers(ny - p + 1))
        x0 = int(rng.integers(nx)) if self.fields.periodic else int(rng.integers(nx - p + 1))
        return n, y0, x0

    def _negate(self, target: np.ndarray, lerp: np.ndarray, channels: Sequence[int]) -> None:
        """Sign change of physical vector components, expressed in model space (in place)."""
        full = self.fields.normalizer.prediction == "full"
        for k in channels:
            # normalised(-x) = -normalised(x) - 2 mean/std; the residual just changes sign
            lerp[k] = -lerp[k] - self._shift[k]
            target[k] = -target[k] - self._shift[k] if full else -target[k]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if index < 0 or index >= len(self):
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        p = self.patch_size
        loss_mask = getattr(self.fields, "loss_mask", None)  # Arrow stores have none
        for _ in range(self.max_tries):
            n, y0, x0 = self._draw(rng)
            target, lerp, static = self.fields.crop(n, y0, x0, p)
            valid = np.isfinite(target)
            if loss_mask is not None:
                valid &= _crop(loss_mask, y0, x0, p)
            if valid.mean() >= self.min_valid_fraction:
                break
        target = np.array(target, dtype=np.float32)  # own the memory: never hand out views of the store
        lerp = np.array(lerp, dtype=np.float32)
        static = np.array(static, dtype=np.float32)
        for axis in self.flips:
            if rng.random() < 0.5:
                reverse = slice(None, None, -1)
                sl = (Ellipsis, reverse) if axis == "lon" else (Ellipsis, reverse, slice(None))
                target, lerp, static, valid = target[sl], lerp[sl], static[sl], valid[sl]
                self._negate(target, lerp, self._signs.get(axis, ()))
        mask = np.ascontiguousarray(valid)  # torch cannot wrap a flipped (negative-stride) view
        condition = np.concatenate([np.nan_to_num(lerp, nan=0.0), static], axis=0)
        return {
            "target": torch.from_numpy(np.where(mask, target, 0.0).astype(np.float32)),
            "condition": torch.from_numpy(np.ascontiguousarray(condition)),
            "mask": torch.from_numpy(mask),
            "sample": n,
            "y": y0,
            "x": x0,
        }


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets (Arrow)
# ----------------------------------------------------------------------------------------------
def _generate_rows(prep: _Prepared, normalizer: Normalizer, meta_json: str, chunk_size: int):
    for i, targets, lerps in prep.chunks(normalizer, chunk_size):
        for j, (target, lerp) in enumerate(zip(targets, lerps)):
            n = i + j
            mask = np.isfinite(target)
            lerp_mask = np.isfinite(lerp)
            row = {
                "target": np.where(mask, target, 0.0).astype(np.float32),
                "mask": mask,
                "condition": np.concatenate([np.where(lerp_mask, lerp, 0.0), prep.static], axis=0).astype(np.float32),
                "lerp_mask": lerp_mask,
                "sample": n,
                "metadata": meta_json,
            }
            for k, v in prep.coords.items():
                row[k] = v[n].item() if hasattr(v[n], "item") else v[n]
            yield row


def build_hf_dataset(
    high_res: xr.Dataset,
    lerp: xr.Dataset,
    normalizer: Normalizer,
    static: xr.Dataset | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    chunk_size: int = 8,
    cache_dir: str | None = None,
    split: str = "train",
) -> datasets.Dataset:
    """Stream normalised full-field samples and their metadata into an Arrow-backed ``datasets.Dataset``.

    Inputs are as for :func:`normalize_fields` and may be lazy and larger than memory: they are computed
    ``chunk_size`` samples at a time and written straight to an Arrow file in the ``datasets`` cache
    (``cache_dir``), which is then memory-mapped. One row per sample (e.g. per member and time step):

    * ``target`` ``(V, H, W)`` float32: model-space target, 0 where invalid;
    * ``mask`` ``(V, H, W)`` bool: valid target points (train on these only);
    * ``condition`` ``(V+S, H, W)`` float32: normalised interpolated low-res (0 where missing) + static;
    * ``lerp_mask`` ``(V, H, W)`` bool: where the interpolated low-res was available;
    * ``sample`` and one column per stacked dim (e.g. ``member``; ``time`` as ISO strings);
    * ``metadata``: the same JSON string on every row (normalisation statistics, transforms, grid,
      units, plus ``metadata``), so it survives ``save_to_disk``, ``to_parquet`` and ``push_to_hub``.

    Rebuilding from the same inputs reuses the cache (the fingerprint is dask's token of the inputs).
    """
    import datasets
    from dask.base import tokenize

    prep = _prepare(high_res, lerp, normalizer, static, metadata)
    meta_json = json.dumps(_metadata(normalizer, prep.lat, prep.lon, list(prep.coords), prep.metadata, prep.periodic),
                           sort_keys=True)
    n, v, ny, nx = prep.high.shape
    c = v + normalizer.num_static
    features = {
        "target": datasets.Array3D(shape=(v, ny, nx), dtype="float32"),
        "mask": datasets.Array3D(shape=(v, ny, nx), dtype="bool"),
        "condition": datasets.Array3D(shape=(c, ny, nx), dtype="float32"),
        "lerp_mask": datasets.Array3D(shape=(v, ny, nx), dtype="bool"),
        "sample": datasets.Value("int64"),
        "metadata": datasets.Value("string"),
    }
    for k, vals in prep.coords.items():
        kind = np.asarray(vals).dtype.kind
        features[k] = datasets.Value("int64" if kind in "iu" else "float64" if kind == "f" else "string")
    fingerprint = tokenize(prep.high, prep.lerp, prep.static, meta_json, FORMAT)
    return datasets.Dataset.from_generator(
        _generate_rows,
        features=datasets.Features(features),
        cache_dir=cache_dir,
        gen_kwargs={"prep": prep, "normalizer": normalizer, "meta_json": meta_json, "chunk_size": int(chunk_size)},
        fingerprint=fingerprint,
        split=datasets.NamedSplit(split),
    )


def read_metadata(dataset) -> dict[str, Any]:
    """The metadata dict stored by :func:`build_hf_dataset` (read from one row, no field data)."""
    if "metadata" not in dataset.column_names:
        raise ValueError("Not a dpdm sample dataset: no `metadata` column.")
    meta = json.loads(dataset.data.column("metadata")[0].as_py())
    if meta.get("format") != FORMAT:
        raise ValueError(f"Unsupported sample format {meta.get('format')!r}; expected {FORMAT!r}.")
    return meta


class ArrowFields:
    """Crops straight from an Arrow-backed sample dataset (memory-mapped; nothing loaded up front).

    Use it when the normalised fields do not fit in memory; :meth:`load` turns it into in-memory
    :class:`NormalizedFields` when they do (faster crops).
    """

    def __init__(self, dataset):
        self.metadata = read_metadata(dataset)
        self.normalizer = Normalizer.from_config(self.metadata)
        self.lat = np.asarray(self.metadata["lat"])
        self.lon = np.asarray(self.metadata["lon"])
        self.periodic = bool(self.metadata["periodic"])
        self._v = self.normalizer.num_variables
        if getattr(dataset, "_indices", None) is not None:  # after shuffle/select: make rows contiguous
            dataset = dataset.flatten_indices()
        self.dataset = dataset.with_format("numpy", columns=["target", "mask", "condition", "lerp_mask"])
        self._table = dataset.data.table
        ny, nx = self.shape
        c = self._v + self.normalizer.num_static
        self._shapes = {"target": (self._v, ny, nx), "mask": (self._v, ny, nx),
                        "condition": (c, ny, nx), "lerp_mask": (self._v, ny, nx)}

    def _row(self, name: str, n: int) -> np.ndarray:
        """One row of an ``Array3D`` column as a numpy view of the memory-mapped Arrow buffer.

        Going below ``datasets``' row formatting avoids copying and converting the whole field
        (about 10x faster); only the crop is copied afterwards.
        """
        import pyarrow as pa

        chunk = next(c for c in self._table.column(name).slice(int(n), 1).chunks if len(c))
        values = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
            values = values.flatten()
        return values.to_numpy(zero_copy_only=False).reshape(self._shapes[name])

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def shape(self) -> tuple[int, int]:
        return self.lat.size, self.lon.size

    def crop(self, n: int, y0: int, x0: int, p: int):
        row = {k: self._row(k, n) for k in self._shapes}
        v = self._v
        target = np.where(_crop(row["mask"], y0, x0, p), _crop(row["target"], y0, x0, p), np.nan)
        cond = _crop(row["condition"], y0, x0, p)
        lerp = np.where(_crop(row["lerp_mask"], y0, x0, p), cond[:v], np.nan)
        return target.astype(np.float32), lerp.astype(np.float32), cond[v:]

    def load(self) -> NormalizedFields:
        """Read every row into memory as :class:`NormalizedFields`."""
        cols = self.dataset[:]
        v = self._v
        target = np.where(cols["mask"], cols["target"], np.nan).astype(np.float32)
        lerp = np.where(cols["lerp_mask"], cols["condition"][:, :v], np.nan).astype(np.float32)
        static = np.asarray(cols["condition"][0, v:], dtype=np.float32)
        sample_dims = self.metadata.get("sample_dims", [])
        raw = self.dataset.with_format(None)
        coords = {k: np.asarray(raw[k]) for k in sample_dims if k in raw.column_names}
        keep = {k: val for k, val in self.metadata.items() if k in ("units", "standard_names")}
        return NormalizedFields(
            target=target, lerp=lerp, static=static, normalizer=self.normalizer, lat=self.lat, lon=self.lon,
            periodic=self.periodic, coords=coords, metadata=keep,
        )
