"""Your own data for training, fine-tuning and calibration: files -> checked pairs, splits, static fields.

One job: everything between "I have netCDF/zarr files of my region" and the (high-res, low-res, static)
xarray objects the training script, ``dpdm finetune`` and ``dpdm calibrate`` consume, with every conversion
a new user would otherwise do by hand:

* **names**: ``variable_map`` (yours -> the model's, e.g. ``{"air_temperature": "surface_temperature"}``) and
  ``static_map`` for the static-field files (e.g. ``{"orog": "topography"}``);
* **units**: required on every variable; compatible units are converted to the model's (pint);
* **grids**: a regional box is trimmed to a multiple of the scale factor (logged, never silently);
  near-regular (e.g. Gaussian) latitudes are put on a regular grid conservatively with ``regular_grid=True``;
* **splits**: time ranges, and a *spatial* validation box for data with few time steps (its points are
  left out of the training loss and scored on their own); no validation at all is warned about.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from . import data
from .grids import Grid, grid_dims
from .naming import COORD_LIKE, apply_variable_map
from .units import require_units

logger = logging.getLogger(__name__)

__all__ = ["RegionData", "box_indices", "declare_units", "load_region", "validation_inputs"]


@dataclass
class RegionData:
    """Paired data of one region with its splits.

    ``train`` / ``validation`` are ``.sel`` indexers on non-spatial dims (``{}`` = all);
    ``validation_box`` is ``(fine_lat_slice, fine_lon_slice)`` of the high-res grid (aligned to whole
    coarse cells) or ``None``.
    """

    pairs: data.PairedData
    static: xr.Dataset | None
    train: dict
    validation: dict | None
    validation_box: tuple[slice, slice] | None = None
    describe: dict = field(default_factory=dict)

    @property
    def has_validation(self) -> bool:
        return self.validation is not None


def _time_indexer(bounds) -> dict:
    if not bounds:
        return {}
    if len(bounds) != 2:
        raise ValueError(f"A time range is [start, end], got {list(bounds)}.")
    return {"time": slice(str(bounds[0]), str(bounds[1]))}


def check_time_selections(times: xr.DataArray, train: dict, validation: dict | None, *,
                          held_out_box: bool = False) -> None:
    """Refuse, before any training, a time range that selects nothing (not in the data, or reversed) and training
    and validation ranges that share time steps (validation would then score training data), unless a validation
    box holds out space instead. Messages give the data's own time range."""
    if "time" not in times.dims or times.size == 0:
        return
    pos = xr.DataArray(np.arange(times.size), coords={"time": times.values}, dims="time")
    span = f"the data runs from {str(times.values[0])[:19]} to {str(times.values[-1])[:19]} ({times.size} steps)"
    picked = {}
    for name, sel in (("train_time", train), ("validation_time", validation)):
        rng = (sel or {}).get("time")
        if not isinstance(rng, slice):
            continue
        try:
            idx = pos.sel(time=rng).values
            backwards = pos.sel(time=slice(rng.stop, rng.start)).values
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"--{name.replace('_', '-')} {rng.start},{rng.stop} cannot select times: {err}; "
                             f"{span}.") from None
        if idx.size == 0:
            why = "is reversed (start after end)" if backwards.size else "selects no time step"
            raise ValueError(f"--{name.replace('_', '-')} {rng.start},{rng.stop} {why}: {span}.")
        picked[name] = set(idx.tolist())
    if len(picked) == 2 and not held_out_box:
        shared = picked["train_time"] & picked["validation_time"]
        if shared:
            raise ValueError(f"--train-time and --validation-time share {len(shared)} time step(s) ({span}): "
                             "validation and spread calibration would measure training data. Give disjoint ranges, "
                             "or hold out a region with --validation-lat-box/--validation-lon-box.")


def box_indices(grid: Grid, scale_factor: int, lat_box, lon_box) -> tuple[slice, slice]:
    """Fine-grid index slices of the whole coarse cells whose centres lie inside ``lat_box``/``lon_box``."""
    coarse = data.coarse_grid(grid, scale_factor)
    if coarse.mapping is not None:  # native grid: the block of coarse cells holding every centre inside the box
        from .native_grids import box_slices

        rows, cols = box_slices(*coarse.geographic(), lat_box or None, lon_box or None)
        return (slice(rows.start * scale_factor, rows.stop * scale_factor),
                slice(cols.start * scale_factor, cols.stop * scale_factor))
    out = []
    for coord, box, name in ((coarse.lat, lat_box, "lat"), (coarse.lon, lon_box, "lon")):
        if not box:
            out.append(slice(0, coord.size * scale_factor))
            continue
        if name == "lon":  # eastwards from the west edge, in any longitude convention (a box may overhang the data)
            west, east = (float(b) for b in box)
            width = (east - west) % 360 or 360.0
            idx = np.nonzero((coord - west) % 360 <= width + 1e-9)[0]
        else:
            lo, hi = sorted(float(b) for b in box)
            idx = np.nonzero((coord >= lo - 1e-9) & (coord <= hi + 1e-9))[0]
        if idx.size == 0:
            raise ValueError(f"The validation {name} box {list(box)} holds no coarse cell centre "
                             f"(the data's coarse {name} is {coord.min():.4g} .. {coord.max():.4g}).")
        out.append(slice(int(idx[0]) * scale_factor, (int(idx[-1]) + 1) * scale_factor))
    return out[0], out[1]


def load_region(
    high_res: Sequence[str] | str | xr.Dataset,
    *,
    scale_factor: int,
    low_res: Sequence[str] | str | xr.Dataset | None = None,
    variables: Sequence[str] | None = None,
    variable_map: Mapping[str, str] | None = None,
    units: Mapping[str, str] | None = None,
    declared_units: Mapping[str, str] | None = None,
    lat_box=None,
    lon_box=None,
    regular_grid: bool = False,
    static_channels: Sequence[str] = (),
    static_files: Mapping[str, str] | None = None,
    static_map: Mapping[str, str] | None = None,
    train_time=None,
    validation_time=None,
    validation_lat_box=None,
    validation_lon_box=None,
) -> RegionData:
    """Open, rename, convert, trim and split a region's data (see the module docstring).

    Args:
        high_res, low_res: paths/globs (netCDF or zarr) or datasets; ``low_res=None`` takes block means.
        variables: the model's variable names (after ``variable_map``); default every variable of the files.
        units: the model's units per variable (fine-tuning); data in compatible units is converted.
        declared_units: units per variable (the model's names) that you declare: set on a variable whose file has
            no ``units`` attribute, else the units its data is converted to (e.g. ``{"tp": "mm"}`` for ``kg m**-2``).
        static_files: ``{channel: path}``; default packaged global topography and land fraction.
    """
    variable_map = data.parse_mapping(variable_map)
    hr = high_res if isinstance(high_res, xr.Dataset) else data.open_dataset(high_res, regular_grid=regular_grid)
    hr = data.standardize(hr, regular_grid=regular_grid)
    if lat_box or lon_box:
        hr = data.select_box(hr, lat=tuple(lat_box) if lat_box else None, lon=tuple(lon_box) if lon_box else None)
    if variables is None:
        names = [str(v) for v in hr.data_vars if str(v) not in COORD_LIKE and set(grid_dims(hr)) <= set(hr[v].dims)]
        hr, _ = apply_variable_map(hr[names], variable_map)
        variables = list(map(str, hr.data_vars))
    else:
        hr, _ = apply_variable_map(hr, variable_map, variables)
    hr = declare_units(hr, declared_units, variables)
    for v in variables:
        require_units(hr[v], v, (units or {}).get(v))
    if units:
        hr = data.convert_to_units(hr, {v: units[v] for v in variables if v in units})
    ya, xa = grid_dims(hr)
    ny, nx = hr.sizes[ya], hr.sizes[xa]
    hr = data.trim_to_multiple(hr, scale_factor)
    if hr.sizes[ya] != ny or hr.sizes[xa] != nx:
        logger.warning("trimmed the %dx%d high-res grid to %dx%d, a multiple of the scale factor %d (dropped the "
                       "last rows/columns)", ny, nx, hr.sizes[ya], hr.sizes[xa], scale_factor)
    lr = None
    if low_res is not None:
        lr = low_res if isinstance(low_res, xr.Dataset) else data.open_dataset(low_res, regular_grid=regular_grid)
        lr, _ = apply_variable_map(data.standardize(lr, regular_grid=regular_grid), variable_map, variables)
        lr = declare_units(lr, declared_units, variables)
        if units:
            lr = data.convert_to_units(lr, {v: units[v] for v in variables if v in units})
    pairs = data.make_pairs(hr, scale_factor=scale_factor, low_res=lr)
    static = None
    if static_channels:
        from .static_fields import get_static_fields

        static = get_static_fields(pairs.grid, list(static_channels), sources=dict(static_files) if static_files else None,
                                   rename=data.parse_mapping(static_map), regular_grid=regular_grid)

    train, validation = _time_indexer(train_time), _time_indexer(validation_time) if validation_time else None
    vbox = None
    if validation and not train and not (validation_lat_box or validation_lon_box) and "time" in pairs.high_res.coords:
        # no training range: everything but the validation range (never train on what validation scores)
        all_times = pairs.high_res["time"]
        held = all_times.sel(**validation).values
        train = {"time": all_times.values[~np.isin(all_times.values, held)]}
        if not train["time"].size:
            raise ValueError(f"--validation-time {list(validation_time)} covers every time step of the data: nothing "
                             "is left to train on. Give a shorter validation range or a --train-time.")
    check_time_selections(pairs.high_res["time"] if "time" in pairs.high_res.coords else xr.DataArray([]), train,
                          validation, held_out_box=bool(validation_lat_box or validation_lon_box))
    if validation_lat_box or validation_lon_box:
        vbox = box_indices(pairs.grid, scale_factor, validation_lat_box, validation_lon_box)
        if validation is None:
            validation = dict(train)  # the box's own points, over the training period
    ntime = hr.sizes.get("time", 1)
    if validation is None:
        warnings.warn(
            f"No validation split: the data has {ntime} time step(s) and neither validation_time nor a validation box "
            "was given, so training cannot report validation scores or calibrate a spread. Hold out some time steps "
            "(validation_time) or, with few time steps, a region (validation_lat_box / validation_lon_box).",
            stacklevel=2,
        )
    describe = {
        "high_res": ", ".join(map(str, [high_res] if isinstance(high_res, str) else high_res))
        if not isinstance(high_res, xr.Dataset) else "in-memory dataset",
        "low_res": f"{scale_factor}x{scale_factor} block mean" if low_res is None else "given low-res source",
        "variables": ", ".join(f"{a} as {b}" for a, b in variable_map.items()) or ", ".join(variables),
        "grid": f"{pairs.grid.shape[0]} x {pairs.grid.shape[1]} high-res points"
        + (f" on a {pairs.grid.mapping.kind} grid" if pairs.grid.mapping is not None else ""),
        "train": str(list(train_time)) if train_time else ("all but validation" if train else "all"),
        "validation": (str(list(validation_time)) if validation_time else "")
        + (f" box lat {list(validation_lat_box or [])} lon {list(validation_lon_box or [])}" if vbox else "") or "none",
    }
    return RegionData(pairs=pairs, static=static, train=train, validation=validation, validation_box=vbox, describe=describe)


def declare_units(ds: xr.Dataset, declared: Mapping[str, str] | None, variables: Sequence[str]) -> xr.Dataset:
    """Set declared units where a variable has none; convert (pint) where it has other, compatible ones."""
    declared = dict(declared or {})
    unknown = sorted(set(declared) - set(variables))
    if unknown:
        raise ValueError(f"units are declared for {unknown}, which are not among the variables {list(variables)}.")
    for v, unit in declared.items():
        if str(ds[v].attrs.get("units", "")).strip():
            ds = data.convert_to_units(ds, {v: unit})
        else:
            logger.info("%s has no units attribute: declared %r", v, unit)
            ds[v] = ds[v].assign_attrs(units=unit)
    return ds


def validation_inputs(region: RegionData, max_samples: int | None = None):
    """``(low_res, truth, static_fields)`` of the validation split, non-spatial dims stacked to ``sample``;
    only the validation box when there is one. ``None`` without a validation split."""
    if region.validation is None:
        return None
    pairs, static, s = region.pairs, region.static, region.pairs.scale_factor
    low, truth = pairs.low_res.sel(**region.validation), pairs.high_res.sel(**region.validation)
    ya, xa = grid_dims(truth)
    if region.validation_box is not None:
        ys, xs = region.validation_box
        truth = truth.isel({ya: ys, xa: xs})
        low = low.isel({ya: slice(ys.start // s, ys.stop // s), xa: slice(xs.start // s, xs.stop // s)})
        static = None if static is None else static.isel({ya: ys, xa: xs})
    dims = [d for d in low[list(low.data_vars)[0]].dims if d not in (ya, xa)]
    if dims:
        def flat(ds):
            ds = ds.stack(sample=dims).drop_vars(["sample", *dims], errors="ignore").transpose("sample", ya, xa)
            return ds.isel(sample=slice(0, max_samples))

        low, truth = flat(low), flat(truth)
    if low.sizes.get("sample", 1) == 0:
        return None
    return low.load(), truth.load(), static  # the pipeline takes the static Dataset as it is
