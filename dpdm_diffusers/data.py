"""Open user climate data lazily and turn it into (high-res, low-res) training pairs.

One job: get from files on disk (netCDF or zarr, one or many, possibly larger than memory) to
standardised, validated :class:`xarray.Dataset` objects that the statistics and sample modules consume.

Conventions after :func:`standardize`:

* spatial dimensions are called ``lat`` and ``lon`` (from ``latitude``/``longitude``/``nav_lat``...),
  both regular (checked), latitude ascending;
* a grid regular in its own coordinates with a CF ``grid_mapping`` (rotated pole, Lambert conformal, polar
  stereographic: :mod:`dpdm_diffusers.native_grids`) keeps them, as dims ``y``/``x`` (ascending, checked regular)
  with the grid-mapping variable as a coordinate; ``lat``/``lon`` are only ever geographic, so the 2-D ones are
  dropped (checked against the mapping first) and rebuilt on output;
* longitude keeps the source convention (0..360 or -180..180) unless asked otherwise; a box that crosses
  the dateline or the prime meridian comes back with a *continuous* longitude axis (e.g. 170..190);
* ``valid_time`` (new ERA5 files) is renamed ``time``.

Everything stays lazy (dask) until the caller computes; nothing here loads the data.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from .grids import (
    LAT_NAMES,
    LON_NAMES,
    Grid,
    check_lat_lon,
    check_regular,
    contiguous_longitude,
    grid_dims,
    interpolate,
    interpolation_methods,
)
from .naming import parse_mapping  # noqa: F401 - public here too (CLI, training configs)
from .native_grids import box_slices, native_axes, standardize_native
from .native_regrid import REGRID_METHODS, regrid_to_native  # noqa: F401 - public here too (a data-layer step)

__all__ = [
    "open_dataset",
    "standardize",
    "set_lon_convention",
    "regularize",
    "select_variables",
    "parse_mapping",
    "convert_to_units",
    "select_time",
    "select_box",
    "check_units",
    "same_units",
    "coarse_grid",
    "trim_to_multiple",
    "coarsen",
    "regrid",
    "regrid_to_native",
    "check_time_axes",
    "make_pairs",
    "PairedData",
]

_TIME_ALIASES = ("valid_time", "Time", "t")


# ----------------------------------------------------------------------------------------------
# opening
# ----------------------------------------------------------------------------------------------
def _expand_paths(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not matches:
            raise FileNotFoundError(f"No files match {p!r}.")
        for m in matches:
            if not os.path.exists(m):
                raise FileNotFoundError(f"No such file or zarr store: {m!r}.")
        out.extend(matches)
    if not out:
        raise FileNotFoundError("No input paths given.")
    return out


def _is_zarr(path: str) -> bool:
    return path.rstrip("/").endswith(".zarr") or (
        os.path.isdir(path)
        and any(os.path.exists(os.path.join(path, f)) for f in (".zgroup", ".zmetadata", "zarr.json"))
    )


def open_dataset(
    paths,
    *,
    variables: Sequence[str] | None = None,
    time=None,
    lat: tuple[float, float] | None = None,
    lon: tuple[float, float] | None = None,
    units: Mapping[str, str] | None = None,
    lon_convention: str | None = None,
    regular_grid: bool = False,
    chunks=None,
    engine: str | None = None,
    **open_kwargs,
) -> xr.Dataset:
    """Open one or many netCDF files or zarr stores lazily and standardise them.

    Parameters
    ----------
    paths
        A path, a glob pattern (``"era5/t2m_*.nc"``) or a list of them. Several files are combined by
        their coordinates (``xarray.open_mfdataset(combine="by_coords")``), e.g. one file per year.
    variables
        Data variables to keep; a missing name raises ``KeyError`` listing what the files hold.
    time
        ``(start, end)`` (inclusive, partial strings like ``"2016-01"`` allowed) or a ``slice``.
    lat, lon
        Box bounds in degrees, ``(south, north)`` and ``(west, east)``. ``west > east`` means the box
        crosses the dateline/prime meridian (e.g. ``(170, -170)``); either longitude convention works.
    units
        Expected units per variable (e.g. ``{"t2m": "K"}``); a mismatch raises ``ValueError``.
    lon_convention
        ``"-180..180"`` or ``"0..360"`` to convert the longitude axis; ``None`` keeps the source's.
    regular_grid
        Put near-regular (e.g. Gaussian) latitudes on a regular grid (:func:`regularize`) instead of refusing them.
    chunks
        Dask chunks; ``None`` uses the on-disk chunking (``{}``), one chunk per file for many files.
    engine
        xarray backend; guessed from the path (``zarr`` for ``*.zarr`` or zarr directories).
    **open_kwargs
        Passed to :func:`xarray.open_dataset` / :func:`xarray.open_mfdataset`.

    Returns
    -------
    xarray.Dataset
        Lazy (dask-backed), with dims named ``lat``/``lon`` (ascending latitude) and ``time``.
    """
    files = _expand_paths(paths)
    if engine is None and all(_is_zarr(f) for f in files):
        engine = "zarr"
    chunks = {} if chunks is None else chunks
    if len(files) == 1:
        ds = xr.open_dataset(files[0], engine=engine, chunks=chunks, **open_kwargs)
    else:
        ds = xr.open_mfdataset(
            files, engine=engine, chunks=chunks, combine="by_coords", data_vars="minimal",
            coords="minimal", compat="override", join="exact", **open_kwargs,
        )
    ds = standardize(ds, lon_convention=lon_convention, regular_grid=regular_grid)
    if variables is not None:
        ds = select_variables(ds, variables)
    if time is not None:
        ds = select_time(ds, time)
    if lat is not None or lon is not None:
        ds = select_box(ds, lat=lat, lon=lon)
    if units is not None:
        check_units(ds, units)
    return ds


# ----------------------------------------------------------------------------------------------
# coordinates
# ----------------------------------------------------------------------------------------------
def _find_dim(ds, names) -> str | None:
    for n in names:
        if n in ds.dims:
            return n
    return None


def standardize(obj, *, lon_convention: str | None = None, regular_grid: bool = False):
    """Rename spatial/time dims to ``lat``/``lon``/``time``, check regularity, sort latitude ascending.

    Works on a Dataset or DataArray. A grid with a CF grid mapping (rotated pole, a projection) becomes dims
    ``y``/``x`` (see the module docstring). Raises ``ValueError`` for curvilinear (2-D lat/lon without a mapping),
    rotated or projected axes without a mapping, and irregular grids, with a message that says what to do;
    ``regular_grid=True`` instead puts a near-regular grid (e.g. Gaussian latitudes) on a regular one with
    :func:`regularize`.
    """
    axes = native_axes(obj)
    if axes is not None:
        if lon_convention is not None or regular_grid:
            raise ValueError(f"lon_convention and regular_grid apply to lat/lon grids; the data are on a "
                             f"{axes.mapping.describe()}.")
        return standardize_native(obj, axes, _TIME_ALIASES)
    la = _find_dim(obj, LAT_NAMES)
    lo = _find_dim(obj, LON_NAMES)
    check_lat_lon(obj, la, lo)  # before renaming: a 2-D `lat` beside the dims is reported by its own name
    if la is None or lo is None:
        raise ValueError(
            f"No latitude/longitude dimensions found in dims {tuple(obj.dims)}; "
            f"expected one of {LAT_NAMES} and one of {LON_NAMES}."
        )
    rename = {}
    if la != "lat":
        rename[la] = "lat"
    if lo != "lon":
        rename[lo] = "lon"
    if "time" not in obj.dims:
        for t in _TIME_ALIASES:
            if t in obj.dims:
                rename[t] = "time"
                break
    existing = set(obj.coords) | (set(obj.data_vars) if isinstance(obj, xr.Dataset) else set())
    clash = [new for new in rename.values() if new in existing and new not in obj.dims]
    if clash:
        obj = obj.drop_vars(clash)
    obj = obj.rename(rename)
    if lon_convention is not None:
        obj = set_lon_convention(obj, lon_convention)
    for d in ("lat", "lon"):
        v = np.asarray(obj[d].values, dtype=np.float64)
        if v.size < 2:
            continue
        step = np.diff(v)
        if np.all(step < 0):
            obj = obj.isel({d: slice(None, None, -1)})  # descending: a lazy view, no sort needed
        elif not np.all(step > 0):
            obj = obj.sortby(d)  # e.g. longitudes stored 0..180 then -180..0
    try:  # a region across the dateline in -180..180 (or Greenwich in 0..360) is regular in the other convention
        obj = contiguous_longitude(obj, "lat", "lon")
    except ValueError:
        pass  # reported below, with what to do
    try:
        check_regular(obj["lat"].values, "lat")
        check_regular(obj["lon"].values, "lon")
    except ValueError as err:
        if "irregular" not in str(err):
            raise
        if not regular_grid:
            raise ValueError(f"{err} Near-regular grids (e.g. Gaussian latitudes) can be put on a regular grid "
                             "conservatively with `dpdm_diffusers.data.regularize(ds)` (training option `regular_grid: true`, `--regular-grid` of "
                             "dpdm train, finetune, calibrate and evaluate; for dpdm downscale, regularize the file "
                             "first and save it).") from None
        obj = regularize(obj)
    obj = obj.assign_coords(
        lat=obj["lat"].assign_attrs(units="degrees_north", standard_name="latitude"),
        lon=obj["lon"].assign_attrs(units="degrees_east", standard_name="longitude"),
    )
    if "time" in obj.dims and obj.sizes["time"] > 1 and "time" in obj.indexes:
        if not obj.indexes["time"].is_monotonic_increasing:
            obj = obj.sortby("time")
    return obj


def input_layout(obj) -> dict:
    """How a file names and orders its grid, so that output can be written the same way (:func:`restore_layout`):
    the names of its latitude, longitude (or native y, x) and time dims and whether they are stored descending."""
    axes = native_axes(obj)
    time = "time" if "time" in obj.dims else next((t for t in _TIME_ALIASES if t in obj.dims), "time")
    if axes is not None:
        out = {"y": axes.y, "x": axes.x, "time": time}
        pairs = (("y_descending", axes.y), ("x_descending", axes.x))
    else:
        la, lo = _find_dim(obj, LAT_NAMES), _find_dim(obj, LON_NAMES)
        out = {"lat": la or "lat", "lon": lo or "lon", "time": time}
        pairs = (("lat_descending", la), ("lon_descending", lo))
    for key, dim in pairs:
        v = np.asarray(obj[dim].values, dtype=np.float64) if dim else np.array([])
        out[key] = bool(v.size > 1 and np.all(np.diff(v) < 0))
    return out


def restore_layout(obj, layout: Mapping | None):
    """Undo :func:`standardize`'s renaming and sorting for a file laid out as ``layout`` (:func:`input_layout`)."""
    if not layout:
        return obj
    for dim in ("lat", "lon", "y", "x"):
        if layout.get(f"{dim}_descending") and dim in obj.dims:
            obj = obj.isel({dim: slice(None, None, -1)})
    rename = {d: layout[d] for d in ("lat", "lon", "y", "x", "time") if d in obj.dims and layout.get(d, d) != d}
    return obj.rename(rename) if rename else obj


def regularize(obj, *, max_irregularity: float = 0.25):
    """Put a near-regular lat/lon grid (e.g. Gaussian latitudes) on a regular one with the same number of
    points, conservatively (area-weighted, with xarray-regrid), so area means are kept.

    A global latitude axis becomes cell centres ``-90 + (i + 1/2) * 180/n``; a regional one spans the same
    first and last values. Axes whose spacing varies by more than ``max_irregularity`` (a fraction of the
    mean step) are refused: that is not a near-regular grid, regrid it deliberately instead.
    """
    import xarray_regrid  # noqa: F401  (registers the .regrid accessor)

    new = {}
    for d in ("lat", "lon"):
        v = np.asarray(obj[d].values, dtype=np.float64)
        step = np.diff(v)
        if np.max(np.abs(step - step.mean())) > max_irregularity * abs(step.mean()):
            raise ValueError(f"`{d}` spacing varies from {step.min():.4g} to {step.max():.4g}: not a near-regular grid.")
        mean = (v[-1] - v[0]) / (v.size - 1)
        if d == "lat" and abs(abs(v[0]) + abs(mean) / 2 - 90) < abs(mean) and abs(abs(v[-1]) + abs(mean) / 2 - 90) < abs(mean):
            new[d] = np.sign(mean) * (-90 + (np.arange(v.size) + 0.5) * 180.0 / v.size)
        else:
            new[d] = v[0] + mean * np.arange(v.size)
    target = xr.Dataset(coords={"lat": new["lat"], "lon": new["lon"]})
    if isinstance(obj, xr.DataArray):
        out = obj.to_dataset(name=obj.name or "__da__").regrid.conservative(target, latitude_coord="lat")
        out = out[obj.name or "__da__"].rename(obj.name)
    else:
        out = obj.regrid.conservative(target, latitude_coord="lat")
        for k in obj.data_vars:
            if k in out.data_vars:
                out[k].attrs = obj[k].attrs
    return out.assign_coords(lat=out["lat"].assign_attrs(obj["lat"].attrs), lon=out["lon"].assign_attrs(obj["lon"].attrs))


def set_lon_convention(obj, convention: str):
    """Express longitude in ``"-180..180"`` or ``"0..360"`` and sort it (a lazy roll of the data)."""
    if convention in ("-180..180", "-180,180", "[-180, 180)"):
        new = (np.asarray(obj["lon"].values, dtype=np.float64) + 180.0) % 360.0 - 180.0
    elif convention in ("0..360", "0,360", "[0, 360)"):
        new = np.asarray(obj["lon"].values, dtype=np.float64) % 360.0
    else:
        raise ValueError(f"Unknown longitude convention {convention!r}; use '-180..180' or '0..360'.")
    obj = obj.assign_coords(lon=xr.DataArray(new, dims="lon", attrs=obj["lon"].attrs))
    return obj.sortby("lon")


def select_variables(ds: xr.Dataset, variables: Sequence[str] | str) -> xr.Dataset:
    """Keep ``variables`` (in that order); ``KeyError`` listing the available ones if any is missing."""
    variables = [variables] if isinstance(variables, str) else list(variables)
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        raise KeyError(
            f"Variables {missing} not found; the data holds {sorted(map(str, ds.data_vars))}. "
            "Rename with `ds.rename({'old': 'new'})` if the names differ."
        )
    return ds[variables]


def convert_to_units(ds: xr.Dataset, units: Mapping[str, str]) -> xr.Dataset:
    """Each ``name: units`` variable of ``ds`` in those units (``degC`` -> ``K`` etc. by pint); a missing
    ``units`` attribute or incompatible units raise ``ValueError`` naming the variable."""
    from .units import convert_units

    return ds.assign({name: convert_units(ds[name], want, name) for name, want in units.items()})


def select_time(obj, time):
    """Select an inclusive time range ``(start, end)`` or a ``slice``; error when nothing is left."""
    if "time" not in obj.dims:
        raise ValueError(f"No `time` dimension to select from (dims {tuple(obj.dims)}).")
    sel = time if isinstance(time, slice) else slice(*time)
    out = obj.sel(time=sel)
    if out.sizes["time"] == 0:
        t = obj["time"].values
        raise ValueError(f"Time selection {sel} is empty; the data covers {t[0]} .. {t[-1]}.")
    return out


def _lon_box_indices(lon: np.ndarray, west: float, east: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``lon`` inside the box from ``west`` eastwards to ``east`` and their continuous values."""
    width = (east - west) % 360.0
    if width == 0 and east != west:
        width = 360.0
    offset = (lon - west) % 360.0
    tol = 1e-9 * max(1.0, abs(west))
    inside = np.nonzero((offset <= width + tol) | (offset >= 360.0 - tol))[0]
    # A point exactly at `west` may have offset ~360 from rounding: fold it back to 0.
    off = offset[inside]
    off = np.where(off >= 360.0 - tol, off - 360.0, off)
    order = np.argsort(off, kind="stable")
    inside, off = inside[order], off[order]
    # Continuous longitudes from `west` as the caller wrote it: a 230..330 box stays 230..330, -10..10 stays -10..10
    return inside, west + off


def select_box(obj, lat: tuple[float, float] | None = None, lon: tuple[float, float] | None = None):
    """Select a lat/lon box (inclusive bounds); boxes across the dateline or 0 meridian work.

    ``lat=(south, north)`` in any order. ``lon=(west, east)`` is read eastwards from ``west``: so
    ``(170, -170)`` or ``(170, 190)`` is a 20-degree box across the dateline, in either source convention.
    The returned longitude is continuous and increasing and starts at ``west`` as given (``170 .. 190`` for
    that box, ``-10 .. 10`` for ``(-10, 10)`` in 0..360 data, ``230 .. 330`` for ``(230, 330)`` in -180..180 data),
    so the result is again a regular grid in the caller's convention.

    On a native (rotated or projected) grid the box is the smallest block of cells holding every cell whose
    centre lies in it: the result is again a regular native grid.
    """
    axes = native_axes(obj)
    if axes is not None:
        rows, cols = box_slices(*Grid.from_xarray(obj).geographic(), lat, lon)
        return obj.isel({axes.y: rows, axes.x: cols})
    if lat is not None:
        south, north = sorted(float(v) for v in lat)
        v = np.asarray(obj["lat"].values, dtype=np.float64)
        idx = np.nonzero((v >= south - 1e-9) & (v <= north + 1e-9))[0]
        if idx.size == 0:
            raise ValueError(f"Latitude box {lat} is empty; data covers {v.min():.4g} .. {v.max():.4g}.")
        obj = obj.isel(lat=slice(idx[0], idx[-1] + 1)) if np.all(np.diff(idx) == 1) else obj.isel(lat=idx)
    if lon is not None:
        west, east = float(lon[0]), float(lon[1])
        v = np.asarray(obj["lon"].values, dtype=np.float64)
        idx, values = _lon_box_indices(v, west, east)
        if idx.size == 0:
            raise ValueError(f"Longitude box {lon} is empty; data covers {v.min():.4g} .. {v.max():.4g}.")
        if np.all(np.diff(idx) == 1):
            obj = obj.isel(lon=slice(idx[0], idx[-1] + 1))
        else:
            obj = obj.isel(lon=idx)  # wraps around the seam: dask gathers from both ends lazily
        obj = obj.assign_coords(lon=xr.DataArray(values, dims="lon", attrs=obj["lon"].attrs))
        if values.size > 1:
            check_regular(values, "lon")
    return obj


# ----------------------------------------------------------------------------------------------
# units
# ----------------------------------------------------------------------------------------------
def same_units(a: str, b: str) -> bool:
    """Whether two unit strings spell the same unit (``"K"``/``"kelvin"``, ``"m/s"``/``"m s-1"``); pint decides."""
    from .units import same_units as _same

    return _same(a, b)


def check_units(ds: xr.Dataset, expected: Mapping[str, str]) -> None:
    """Raise ``ValueError`` when a variable's ``units`` attribute is missing or differs from ``expected``."""
    problems = []
    for name, want in expected.items():
        if name not in ds.data_vars:
            raise KeyError(f"Variable {name!r} not found; the data holds {sorted(map(str, ds.data_vars))}.")
        have = ds[name].attrs.get("units")
        if have is None:
            problems.append(f"{name}: no `units` attribute (expected {want!r})")
        elif not same_units(have, want):
            problems.append(f"{name}: {have!r} (expected {want!r})")
    if problems:
        raise ValueError("Mismatched units: " + "; ".join(problems) + ". Convert the data before training.")


# ----------------------------------------------------------------------------------------------
# pairs
# ----------------------------------------------------------------------------------------------
def coarse_grid(grid: Grid, factor: int) -> Grid:
    """The grid of ``factor x factor`` block means of ``grid`` (its ``refine(factor)`` is ``grid`` again)."""
    ny, nx = grid.shape
    if factor < 1 or ny % factor or nx % factor:
        raise ValueError(
            f"Grid {ny}x{nx} is not divisible by the scale factor {factor}; "
            "crop it with `trim_to_multiple(ds, factor)` first."
        )
    return Grid(grid.lat.reshape(-1, factor).mean(1), grid.lon.reshape(-1, factor).mean(1), grid.mapping)


def trim_to_multiple(obj, factor: int):
    """Drop trailing rows/columns so both spatial sizes are multiples of ``factor``.

    On a periodic (global) grid longitude is never trimmed silently: a global grid whose size is not a
    multiple of the factor cannot be coarsened without breaking periodicity, so it raises instead.
    """
    ya, xa = grid_dims(obj)
    ny, nx = obj.sizes[ya], obj.sizes[xa]
    if nx % factor and Grid.from_xarray(obj).periodic:
        raise ValueError(f"Global longitude axis of {nx} points is not divisible by the scale factor {factor}.")
    return obj.isel({ya: slice(0, ny - ny % factor), xa: slice(0, nx - nx % factor)})


def coarsen(high_res: xr.Dataset, factor: int) -> xr.Dataset:
    """Perfect-model low-res: the mean over ``factor x factor`` blocks (lazy).

    Missing values are skipped inside a block (a coastal block of ERA5-Land averages its land points);
    a block with no valid point is missing. Coordinates become the block centres.
    """
    coarse_grid(Grid.from_xarray(high_res), factor)  # validates divisibility with a clear message
    ya, xa = grid_dims(high_res)
    out = high_res.coarsen({ya: factor, xa: factor}, boundary="exact").mean(keep_attrs=True)
    return out.assign_coords({ya: out[ya].assign_attrs(high_res[ya].attrs), xa: out[xa].assign_attrs(high_res[xa].attrs)})


def regrid(obj, grid: Grid, method="bilinear"):
    """Interpolate ``obj`` (dims ``lat``/``lon``, or a native grid's axes) onto ``grid`` with :func:`grids.interpolate`
    (lazy); a lat/lon field for a native ``grid`` goes through :func:`regrid_to_native`.

    ``method``: ``"bilinear"``/``"bicubic"``, or for a Dataset one per data variable (a list in their order, as a
    model's ``interpolation`` holds them).

    Used both to bring a real low-res source onto the coarse grid that matches the target and to make
    the interpolated low-res ("lerp") on the target grid, so training matches the pipeline exactly.
    A non-global source is first shifted by a multiple of 360 degrees so its longitudes face the target's.
    """
    src = Grid.from_xarray(obj)
    if src.mapping != grid.mapping:
        if src.mapping is None:  # a lat/lon field for a rotated or projected target
            return regrid_to_native(obj, grid, method)
        raise ValueError(f"Cannot interpolate from a {src.describe()} to a {grid.describe()}: regrid the data to "
                         "the target's grid or to regular lat/lon first.")
    ya, xa = grid_dims(obj)  # lat/lon, or a native grid's y/x (same mapping: interpolated on its own axes)
    if src.mapping is None and not src.periodic:
        shift = 360.0 * np.round((np.mean(grid.lon) - np.mean(src.lon)) / 360.0)
        if shift:
            obj = obj.assign_coords({xa: obj[xa] + shift})
            src = Grid(src.lat, src.lon + shift)
    if isinstance(obj, xr.Dataset):
        methods = interpolation_methods(method, len(obj.data_vars))
        out = xr.Dataset({k: _regrid_array(v, src, grid, m, (ya, xa)) for (k, v), m in zip(obj.data_vars.items(), methods)},
                         attrs=obj.attrs)
    else:
        if not isinstance(method, str):
            raise ValueError(f"One interpolation method regrids a DataArray, got {method!r}.")
        out = _regrid_array(obj, src, grid, method, (ya, xa))
    return out.assign_coords({ya: xr.DataArray(grid.lat, dims=ya, attrs=obj[ya].attrs),
                              xa: xr.DataArray(grid.lon, dims=xa, attrs=obj[xa].attrs)})


def _regrid_array(da: xr.DataArray, src: Grid, grid: Grid, method: str, dims: tuple[str, str]) -> xr.DataArray:
    ya, xa = dims
    if not np.issubdtype(da.dtype, np.floating):
        da = da.astype(np.float32)  # interpolation keeps the input dtype: integers would truncate
    if da.chunks is not None:
        da = da.chunk({ya: -1, xa: -1})  # interpolation needs whole spatial fields per block
    out = xr.apply_ufunc(
        interpolate, da, kwargs={"src": src, "dst": grid, "method": method},
        input_core_dims=[[ya, xa]], output_core_dims=[[ya, xa]],
        exclude_dims={ya, xa}, dask="parallelized", keep_attrs=True,
        dask_gufunc_kwargs={"output_sizes": {ya: grid.shape[0], xa: grid.shape[1]}},
        output_dtypes=[da.dtype],
    )
    return out.drop_vars([c for c in (ya, xa) if c in out.coords])


def check_time_axes(high_res, low_res, tolerance=None):
    """Check both have the same time axis; return ``low_res`` (relabelled to high-res times if tolerant).

    ``tolerance`` (anything :func:`pandas.to_timedelta` reads, e.g. ``"16D"``) accepts time stamps that
    differ by at most that much, e.g. monthly means stamped mid-month in one source and on day 1 in the
    other; the low-res time labels are then replaced by the high-res ones.
    """
    import pandas as pd

    h_has, l_has = "time" in high_res.dims, "time" in low_res.dims
    if not h_has and not l_has:
        return low_res
    if h_has != l_has:
        raise ValueError("Only one of high-res and low-res has a `time` dimension.")
    th, tl = high_res.indexes["time"], low_res.indexes["time"]
    if len(th) != len(tl):
        raise ValueError(
            f"Time axes differ in length: high-res {len(th)} steps ({th[0]} .. {th[-1]}), "
            f"low-res {len(tl)} steps ({tl[0]} .. {tl[-1]}). Select the same period in both."
        )
    if tolerance is None:
        equal = np.array([a == b for a, b in zip(th, tl)])
    else:
        diff = np.abs(np.asarray(pd.to_timedelta(np.asarray(th - tl))))
        equal = diff <= pd.to_timedelta(tolerance).to_timedelta64()
    if not equal.all():
        i = int(np.argmin(equal))
        hint = "" if tolerance is not None else " Pass `time_tolerance` (e.g. '16D') if only the stamping differs."
        raise ValueError(
            f"Time axes differ at step {i}: high-res {th[i]} vs low-res {tl[i]} "
            f"({int((~equal).sum())} of {len(th)} steps differ).{hint}"
        )
    if tolerance is not None:
        low_res = low_res.assign_coords(time=high_res["time"])
    return low_res


@dataclass
class PairedData:
    """High-res target and its low-res input on the matching coarse grid.

    ``high_res`` has dims ``(..., lat, lon)`` on the target grid; ``low_res`` has the same variables and
    non-spatial dims on ``coarse_grid`` (``lat``/``lon`` of ``1/scale_factor`` the size).
    """

    high_res: xr.Dataset
    low_res: xr.Dataset
    scale_factor: int

    @property
    def grid(self) -> Grid:
        return Grid.from_xarray(self.high_res)

    @property
    def coarse_grid(self) -> Grid:
        return Grid.from_xarray(self.low_res)

    @property
    def variables(self) -> list[str]:
        return list(map(str, self.high_res.data_vars))

    def lerp(self, method="bilinear") -> xr.Dataset:
        """The low-res interpolated to the target grid (lazy), exactly as the pipeline computes it (``method``: one,
        or one per variable)."""
        return regrid(self.low_res, self.grid, method=method)

    def isel(self, **indexers) -> PairedData:
        """Index non-spatial dims (e.g. ``time``) of both datasets at once."""
        return PairedData(self.high_res.isel(**indexers), self.low_res.isel(**indexers), self.scale_factor)

    def sel(self, **indexers) -> PairedData:
        """Select on non-spatial dims (e.g. ``time=slice("2016", "2021")``) of both datasets at once."""
        return PairedData(self.high_res.sel(**indexers), self.low_res.sel(**indexers), self.scale_factor)


def _spacing_ratio(coarse: Grid, fine: Grid) -> int:
    r = coarse.dlat / fine.dlat
    if abs(r - round(r)) > 0.05 * r:
        raise ValueError(f"Low-res spacing is {r:.3g}x the high-res spacing, not an integer: pass `scale_factor`.")
    return int(round(r))


def make_pairs(
    high_res: xr.Dataset,
    *,
    scale_factor: int | None = None,
    low_res: xr.Dataset | None = None,
    regrid_method: str = "bilinear",
    time_tolerance=None,
) -> PairedData:
    """Build the low-res side of the training pairs.

    * ``low_res=None`` (perfect model): block-mean coarsening of ``high_res`` by ``scale_factor``.
    * ``low_res`` given (e.g. 20CR at 1 degree for ERA5 at 0.1): the same variables with the same units
      and the same time axis are required (checked, clear errors); it is regridded with
      :func:`grids.interpolate` onto the coarse grid whose ``refine(scale_factor)`` is the target grid.
      ``scale_factor`` defaults to the ratio of grid spacings.

    Both inputs should come from :func:`open_dataset` / :func:`standardize`.
    """
    grid = Grid.from_xarray(high_res)
    if low_res is None:
        if scale_factor is None:
            raise ValueError("Pass `scale_factor` (perfect-model coarsening) or a `low_res` dataset.")
        return PairedData(high_res, coarsen(high_res, int(scale_factor)), int(scale_factor))

    low_res = standardize(low_res)
    variables = list(map(str, high_res.data_vars))
    missing = [v for v in variables if v not in low_res.data_vars]
    if missing:
        raise KeyError(
            f"Low-res data lacks variables {missing} (it holds {sorted(map(str, low_res.data_vars))}); "
            "rename them to the high-res names."
        )
    low_res = low_res[variables]
    mismatched = []
    for v in variables:
        hu, lu = high_res[v].attrs.get("units"), low_res[v].attrs.get("units")
        if (hu is None) != (lu is None):
            mismatched.append(f"{v}: units given on one side only ({hu!r} vs {lu!r})")
        elif hu is not None and not same_units(hu, lu):
            from .units import compatible_units

            if not compatible_units(lu, hu):
                mismatched.append(f"{v}: high-res {hu!r} vs low-res {lu!r}")
    if mismatched:
        raise ValueError("Mismatched units: " + "; ".join(mismatched) + ". Convert one side first.")
    low_res = convert_to_units(low_res, {v: high_res[v].attrs["units"] for v in variables if "units" in high_res[v].attrs})
    low_res = check_time_axes(high_res, low_res, tolerance=time_tolerance)
    if scale_factor is None:
        coarse = Grid.from_xarray(low_res)
        if coarse.mapping != grid.mapping:
            raise ValueError(f"The low-res data are on a {coarse.describe()}, the high-res on a {grid.describe()}: "
                             "pass scale_factor (the spacing ratio of different grid kinds says nothing).")
        scale_factor = _spacing_ratio(coarse, grid)
    target = coarse_grid(grid, int(scale_factor))
    return PairedData(high_res, regrid(low_res, target, method=regrid_method), int(scale_factor))
