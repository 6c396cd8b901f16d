"""Static conditioning fields (topography, land fraction) for any regular lat/lon grid.

One job: provide the static channels of the model on whatever grid the user downscales to.

Sources (optional extra ``pip install 'dpdm-diffusers[data]'``), both global and shipped inside packages:

* **topography** (m): ``pvlib/data/Altitude.h5``, 5-arcmin cell means, ``metres = v * 28 - 450``;
  ``v == 255`` marks no data (ocean, poleward of about 85 degrees) and is read as 0 m.
* **land_sea_mask** (land fraction 0..1, 1 = land): ``global_land_mask`` 30-arcsec GLOBE mask
  (``True`` = ocean). It is first reduced *exactly* to the land fraction of each 5-arcmin cell (the
  10 x 10 fine cells inside it), so both fields share one 5-arcmin source grid.

Both are then **area-averaged** onto the target grid: each target cell receives the mean of the source
cells it overlaps, weighted by overlap area on the sphere (``d(sin lat) * d lon``), with periodic
longitude, so any latitude order and either longitude convention (0..360, -180..180) works and global
means are conserved. Target cells finer than 5 arcmin therefore carry 5-arcmin detail.

On a native grid (rotated pole, a projection: :mod:`dpdm_diffusers.native_grids`) each cell's value is the mean
over its footprint on Earth: ``k x k`` points spread evenly inside the cell (``k`` so that they lie at most half a
source cell apart, at most 8) are placed by pyproj and read from the source.

The user's own files (or arrays) can replace either source (``get_static_fields(grid, sources=...)``);
they are area-averaged when finer than the target and bilinearly interpolated when coarser.

Cost: the 30-arcsec mask (933 MB unpacked) is streamed once per machine (about 4 s) and its 5-arcmin
land fraction is kept in a small disk cache (``$DPDM_CACHE_DIR`` or ``~/.cache/dpdm_diffusers``) and in
memory; results per target grid are memoised with :func:`functools.lru_cache`.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import xarray as xr

from .grids import Grid, grid_dims, interpolate

__all__ = ["STATIC_CHANNELS", "STATIC_ATTRS", "get_static_fields", "area_average", "static_dataset"]

STATIC_CHANNELS = ("topography", "land_sea_mask")
STATIC_ATTRS = {
    "topography": {
        "units": "m",
        "standard_name": "surface_altitude",
        "long_name": "surface elevation above sea level, area mean (ocean = 0 m)",
    },
    "land_sea_mask": {
        "units": "1",
        "standard_name": "land_area_fraction",
        "long_name": "land fraction of the grid cell (1 = land, 0 = ocean)",
    },
}
_EXTRA = "pip install 'dpdm-diffusers[data]'"
_SOURCES = {
    "topography": ("pvlib", "data/Altitude.h5", "pvlib Altitude.h5 (5 arcmin)"),
    "land_sea_mask": ("global_land_mask", "globe_combined_mask_compressed.npz",
                      "global-land-mask GLOBE 30 arcsec, reduced to 5-arcmin land fraction"),
}
_PIP_NAMES = {"pvlib": "pvlib", "global_land_mask": "global-land-mask"}
_N5 = (2160, 4320)  # 5-arcmin global grid: rows 90N -> 90S, columns 180W -> 180E
_G = 9.80665


# ----------------------------------------------------------------------------------------------
# packaged sources
# ----------------------------------------------------------------------------------------------
def _package_file(package: str, relpath: str) -> Path:
    """Path of a data file inside an installed package, without importing it.

    (Importing ``global_land_mask`` would unpack its 933 MB mask into memory at import time.)
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"Static fields need the optional package `{_PIP_NAMES.get(package, package)}`; "
            f"install the data extra: {_EXTRA}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed `{package}` package; reinstall it ({_EXTRA}).")
    return path


def _source_grid() -> Grid:
    """Cell centres of the 5-arcmin source grid (latitude descending, longitude -180..180)."""
    lat = 90.0 - (np.arange(_N5[0]) + 0.5) / 12.0
    lon = -180.0 + (np.arange(_N5[1]) + 0.5) / 12.0
    return Grid(lat, lon)


@lru_cache(maxsize=1)
def _topography_5min() -> np.ndarray:
    path = _package_file("pvlib", "data/Altitude.h5")
    try:
        import h5py
    except ImportError as err:  # h5py comes with h5netcdf, a core dependency
        raise ImportError(f"Reading {path.name} needs h5py; {_EXTRA}") from err
    with h5py.File(path, "r") as f:
        v = f["Altitude"][:]
    if v.shape != _N5:
        raise ValueError(f"Unexpected shape {v.shape} of {path}; expected {_N5}.")
    out = np.where(v == 255, 0.0, v.astype(np.float32) * 28.0 - 450.0).astype(np.float32)
    out.flags.writeable = False
    return out


def _cache_dir() -> Path:
    root = os.environ.get("DPDM_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpdm_diffusers"


def _save_cache(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to the ``.npy`` cache file ``path`` atomically; a cache is an optimisation only, so a failure
    to write it is ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as tmp:
            np.save(tmp, array)
        os.replace(tmp.name, path)
    except OSError:
        pass


def _stream_land_count(path: Path) -> np.ndarray:
    """Number of land 30-arcsec cells (0..100) in each 5-arcmin cell, streamed row band by row band."""
    with zipfile.ZipFile(path) as z, z.open("mask.npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = header(f)
        if shape != (_N5[0] * 10, _N5[1] * 10) or fortran or dtype != np.bool_:
            raise ValueError(f"Unexpected land mask layout {shape}, {dtype}, fortran={fortran} in {path}.")
        out = np.empty(_N5, dtype=np.uint8)
        band = 120  # 5-arcmin rows per read: 1200 x 43200 bytes = 52 MB
        ncol = shape[1]
        for r0 in range(0, _N5[0], band):
            buf = f.read(band * 10 * ncol)
            ocean = np.frombuffer(buf, dtype=np.uint8).reshape(band, 10, ncol)
            rows = ocean.sum(axis=1, dtype=np.uint8)  # <= 10 per fine column
            ocean_count = rows.reshape(band, _N5[1], 10).sum(axis=-1, dtype=np.uint8)
            out[r0:r0 + band] = 100 - ocean_count
    return out


@lru_cache(maxsize=1)
def _land_fraction_5min() -> np.ndarray:
    path = _package_file("global_land_mask", "globe_combined_mask_compressed.npz")
    st = path.stat()
    cache = _cache_dir() / f"land_count_5min_{st.st_size}_{int(st.st_mtime)}.npy"
    count = None
    if cache.exists():
        try:
            count = np.load(cache)
            if count.shape != _N5 or count.dtype != np.uint8:
                count = None
        except (OSError, ValueError):
            count = None
    if count is None:
        count = _stream_land_count(path)
        _save_cache(cache, count)
    out = count.astype(np.float32) / 100.0
    out.flags.writeable = False
    return out


_LOADERS = {"topography": _topography_5min, "land_sea_mask": _land_fraction_5min}


# ----------------------------------------------------------------------------------------------
# conservative (area-weighted) averaging
# ----------------------------------------------------------------------------------------------
def _edges(centres: np.ndarray) -> np.ndarray:
    step = centres[1] - centres[0]
    return np.concatenate([centres - step / 2, [centres[-1] + step / 2]])


def _overlap_matrix(src_edges, dst_edges, *, periodic: bool, measure):
    """Sparse ``(n_dst, n_src)`` matrix of overlap measures between ascending cell intervals."""
    from scipy import sparse

    rows, cols, vals = [], [], []
    lo, hi = src_edges[0], src_edges[-1]
    n_src = src_edges.size - 1
    for i in range(dst_edges.size - 1):
        a, b = dst_edges[i], dst_edges[i + 1]
        if periodic:
            a0 = lo + (a - lo) % 360.0
            pieces = [(a0, min(a0 + (b - a), hi))]
            if a0 + (b - a) > hi:  # the target cell wraps across the source seam
                pieces.append((lo, lo + (a0 + (b - a) - hi)))
        else:
            pieces = [(max(a, lo), min(b, hi))]
        for p, q in pieces:
            if q <= p:
                continue
            k0 = max(int(np.searchsorted(src_edges, p, side="right")) - 1, 0)
            k1 = min(int(np.searchsorted(src_edges, q, side="left")), n_src)
            k = np.arange(k0, k1)
            w = measure(np.minimum(src_edges[k + 1], q)) - measure(np.maximum(src_edges[k], p))
            keep = w > 0
            rows.append(np.full(int(keep.sum()), i))
            cols.append(k[keep])
            vals.append(w[keep])
    if not rows:
        return sparse.csr_matrix((dst_edges.size - 1, n_src))
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(dst_edges.size - 1, n_src)
    )


def _sin_deg(x):
    return np.sin(np.deg2rad(np.clip(x, -90.0, 90.0)))


def _identity(x):
    return x


def area_average(values: np.ndarray, src: Grid, dst: Grid) -> np.ndarray:
    """Area-weighted mean of ``values`` (``(..., src.lat, src.lon)``) over each ``dst`` cell.

    Weights are exact overlap areas on the sphere (cells are bounded half-way between centres, clipped
    at the poles). Longitude wraps when ``src`` is global; either convention and latitude order work.
    NaN source cells are ignored; a target cell that overlaps no valid source cell is NaN.
    """
    values = np.asarray(values)
    if values.shape[-2:] != src.shape:
        raise ValueError(f"Values of shape {values.shape} do not match the source grid {src.shape}.")
    slat, slon = src.lat, src.lon
    if slat[0] > slat[-1]:
        slat, values = slat[::-1], values[..., ::-1, :]
    if slon[0] > slon[-1]:
        slon, values = slon[::-1], values[..., ::-1]
    dlat_desc, dlon_desc = dst.lat[0] > dst.lat[-1], dst.lon[0] > dst.lon[-1]
    tlat = dst.lat[::-1] if dlat_desc else dst.lat
    tlon = dst.lon[::-1] if dlon_desc else dst.lon
    periodic = src.periodic
    if not periodic:  # face the source: same longitude convention as a regional source file
        tlon = tlon + 360.0 * np.round((np.mean(slon) - np.mean(tlon)) / 360.0)
    wy = _overlap_matrix(np.clip(_edges(slat), -90, 90), np.clip(_edges(tlat), -90, 90),
                         periodic=False, measure=_sin_deg)
    wx = _overlap_matrix(_edges(slon), _edges(tlon), periodic=periodic, measure=_identity)

    batch = values.shape[:-2]
    flat = values.reshape(-1, *src.shape)
    out = np.empty((flat.shape[0], *dst.shape), dtype=np.float64)
    for i, v in enumerate(flat):
        valid = np.isfinite(v)
        if valid.all():  # the common case: covered weight is separable, skip a second product
            num = (wx @ (wy @ v.astype(np.float64)).T).T
            den = np.outer(np.asarray(wy.sum(axis=1)).ravel(), np.asarray(wx.sum(axis=1)).ravel())
        else:
            num = (wx @ (wy @ np.where(valid, v, 0.0).astype(np.float64)).T).T
            den = (wx @ (wy @ valid.astype(np.float64)).T).T
        with np.errstate(invalid="ignore", divide="ignore"):
            res = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        if dlat_desc:
            res = res[::-1]
        if dlon_desc:
            res = res[:, ::-1]
        out[i] = res
    return out.reshape(*batch, *dst.shape)


def footprint_mean(values: np.ndarray, src: Grid, dst: Grid, method: str = "nearest") -> np.ndarray:
    """Mean of regular lat/lon fields ``values`` (``(..., src.lat, src.lon)``) over the footprint on Earth of each
    cell of the native grid ``dst``: ``k x k`` points per cell (:func:`~dpdm_diffusers.native_grids.footprint_points`,
    placed once for all fields), ``k`` so that they lie at most half a source cell apart (at most 8), each read from
    the source by ``method`` (``"nearest"`` for a source of cell means, ``"linear"`` for point values). A cell smaller
    than half a source cell (one point) reads the source bilinearly either way, as a finer target interpolates a
    coarser user field: a blocky copy of the source cells would draw their edges (a 9 km staircase coastline on a
    1.5 km grid) into the static channels. Points outside the source are NaN, and so is any cell that has one."""
    from scipy.interpolate import RegularGridInterpolator

    from .native_grids import footprint_points

    if dst.mapping is None or src.mapping is not None:
        raise ValueError("footprint_mean reads a lat/lon source onto a native (rotated or projected) grid.")
    step = min(abs(float(np.diff(dst.y[:2])[0])), abs(float(np.diff(dst.x[:2])[0]))) * dst.mapping.axis_scale
    cell_deg = step if dst.mapping.rotated else step / 111_195.0
    k = int(np.clip(np.ceil(2 * cell_deg / min(src.dlat, src.dlon)), 1, 8))
    if k == 1:
        method = "linear"
    plat, plon = footprint_points(dst.mapping, dst.y, dst.x, k)
    values = np.asarray(values, dtype=np.float64)
    lead = values.shape[:-2]
    v = np.moveaxis(values.reshape(-1, *src.shape), 0, -1)  # (lat, lon, fields): one interpolation for all fields
    slat, slon = src.lat, src.lon
    if slat[0] > slat[-1]:
        slat, v = slat[::-1], v[::-1]
    if slon[0] > slon[-1]:
        slon, v = slon[::-1], v[:, ::-1]
    plon = slon[0] + np.mod(plon - slon[0], 360.0)  # face the source's longitude convention
    if src.periodic:  # one column more at the seam, so points between the last and the first centre are inside
        slon, v = np.append(slon, slon[0] + 360.0), np.concatenate([v, v[:, :1]], axis=1)

    def inside(p, axis, half):  # within half a cell beyond the outer centres: still in the outer cell
        held = np.clip(p, axis[0], axis[-1])
        return np.where(np.abs(held - p) <= half, held, np.nan)

    points = np.stack([inside(plat, slat, src.dlat / 2).ravel(), inside(plon, slon, src.dlon / 2).ravel()], axis=-1)
    sampled = RegularGridInterpolator((slat, slon), v, method=method, bounds_error=False, fill_value=np.nan)(points)
    ny, nx = dst.shape
    means = sampled.reshape(ny, k, nx, k, -1).mean(axis=(1, 3))  # (ny, nx, fields)
    return np.moveaxis(means, -1, 0).reshape(*lead, ny, nx)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _packaged_on_grid(name: str, lat_key: bytes, lon_key: bytes, mapping=None) -> np.ndarray:
    """Area average of a packaged source onto a grid, memoised on the grid's coordinate bytes (and mapping)."""
    import hashlib

    grid = Grid(np.frombuffer(lat_key, dtype=np.float64), np.frombuffer(lon_key, dtype=np.float64), mapping)
    # also on disk, per grid: a new process skips reading the 5-arcmin sources (1.2 s for a global N96 grid here;
    # the first ever call also builds the land-count cache, 4 s); the key covers the grid and the package's data
    key = lat_key + lon_key + _SOURCE_VERSION.encode() + (_NATIVE_VERSION.encode() + repr(mapping).encode() if mapping is not None else b"")
    digest = hashlib.blake2b(key, digest_size=12).hexdigest()
    cache = _cache_dir() / "static_on_grid" / f"{name}_{digest}.npy"
    out = None
    try:
        out = np.load(cache)
        if out.shape != grid.shape or out.dtype != np.float32:
            out = None
    except (OSError, ValueError):
        out = None
    if out is None:
        if mapping is not None:
            out = footprint_mean(_LOADERS[name](), _source_grid(), grid).astype(np.float32)
        else:
            out = area_average(_LOADERS[name](), _source_grid(), grid).astype(np.float32)
        if name == "land_sea_mask":
            out = np.clip(out, 0.0, 1.0)
        _save_cache(cache, out)
    out.flags.writeable = False
    return out


# bump when the packaged sources or their averaging change: per-grid caches written before are then not read
_SOURCE_VERSION = "pvlib-Altitude.h5+global-land-mask/area-average-v1"
_NATIVE_VERSION = "footprint-mean-v2"  # bump when the footprint averaging on native grids changes


def static_dataset(grid: Grid, fields: Mapping[str, np.ndarray], source: Mapping[str, str] | None = None) -> xr.Dataset:
    """Wrap ``{name: (lat, lon) array}`` as a CF-annotated Dataset on ``grid`` (dims ``y``/``x``, 2-D ``lat``/``lon``
    and the grid mapping on a native grid)."""
    from .native_grids import output_coords

    if grid.mapping is None:
        dims = ("lat", "lon")
        coords = output_coords(grid, *dims, {"units": "degrees_north", "standard_name": "latitude"},
                               {"units": "degrees_east", "standard_name": "longitude"})
    else:
        dims = ("y", "x")
        coords = output_coords(grid, *dims)
    data = {}
    for name, values in fields.items():
        attrs = dict(STATIC_ATTRS.get(name, {}))
        if grid.mapping is not None:
            attrs["grid_mapping"] = grid.mapping.name
        if source and name in source:
            attrs["source"] = source[name]
        data[name] = xr.DataArray(np.asarray(values, dtype=np.float32), dims=dims, attrs=attrs)
    return xr.Dataset(data, coords=coords)


def _pick_variable(obj, name: str, rename: Mapping[str, str] | None = None) -> xr.DataArray:
    if isinstance(obj, xr.DataArray):
        return obj
    # a grid-mapping variable travels with the field (as a coordinate) and is never a candidate itself
    obj = obj.set_coords([k for k, v in obj.data_vars.items() if "grid_mapping_name" in v.attrs])
    mapped = [k for k, v in (rename or {}).items() if v == name]
    if mapped:
        if mapped[0] not in obj.data_vars:
            raise KeyError(f"static_map names {mapped[0]!r} for the {name}, but the file holds {sorted(map(str, obj.data_vars))}.")
        return obj[mapped[0]]
    candidates = {
        "topography": ("topography", "orog", "orography", "elevation", "altitude", "height", "z", "hgt", "surface_altitude"),
        "land_sea_mask": ("land_sea_mask", "lsm", "sftlf", "landmask", "land_mask", "mask", "land_area_fraction", "lsmask"),
    }.get(name, (name,))
    names = list(map(str, obj.data_vars))
    if len(names) == 1:
        return obj[names[0]]
    for c in candidates:
        if c in obj.data_vars:
            return obj[c]
    for v in names:
        if obj[v].attrs.get("standard_name") == STATIC_ATTRS.get(name, {}).get("standard_name"):
            return obj[v]
    raise KeyError(f"Cannot tell which of {names} is the {name}: map it with static_map={{'<your name>': {name!r}}} "
                   f"(CLI: --static-map <your name>={name}) or pass a DataArray.")


def _user_field(source, name: str, grid: Grid, rename: Mapping[str, str] | None = None,
                regular_grid: bool = False) -> np.ndarray:
    """A user's topography or land-sea mask (file, Dataset or DataArray) on ``grid``, in canonical units."""
    from .data import open_dataset, standardize

    obj = open_dataset(source, regular_grid=regular_grid) if isinstance(source, (str, os.PathLike)) else source
    da = standardize(_pick_variable(obj, name, rename), regular_grid=regular_grid)
    ya, xa = grid_dims(da)
    extra = [d for d in da.dims if d not in (ya, xa)]
    for d in extra:  # invariant fields often carry a length-1 time axis
        if da.sizes[d] != 1:
            raise ValueError(f"Static {name} has a non-singleton dimension {d!r} ({da.sizes[d]}).")
    da = da.squeeze(extra, drop=True).transpose(ya, xa)
    values = np.asarray(da.values, dtype=np.float64)
    units = str(da.attrs.get("units", "")).replace(" ", "").replace("**", "").lower()
    if name == "topography":
        if units in ("m2s-2", "m^2s^-2", "m2/s2"):
            values = values / _G  # ERA5 `z` is surface geopotential
        elif units == "km":
            values = values * 1000.0
        values = np.where(np.isfinite(values), values, 0.0)  # ocean / no data is sea level
    elif name == "land_sea_mask":
        if units in ("%", "percent"):
            values = values / 100.0
        values = np.where(np.isfinite(values), values, 0.0)
        if values.min() < -1e-6 or values.max() > 1 + 1e-6:
            raise ValueError(
                f"Land-sea mask values span {values.min():.3g} .. {values.max():.3g}; expected a land fraction "
                "in [0, 1] (1 = land). Set units='%' for percentages."
            )
    src = Grid.from_xarray(da)
    if src.mapping is None and grid.mapping is None:
        if src.dlat < grid.dlat * 0.999 or src.dlon < grid.dlon * 0.999:
            out = area_average(values, src, grid)
        else:
            out = interpolate(values, src, grid, method="bilinear")
    elif src.mapping is None:  # a lat/lon file (ERA5 `z`, CMIP `orog`) for a rotated or projected target
        out = footprint_mean(values, src, grid, method="linear")
    elif src.mapping == grid.mapping:  # on the target's own grid (or another resolution of it)
        out = values if src.same_cells(grid) else interpolate(values, src, grid, method="bilinear")
    else:
        raise ValueError(f"The {name} file is on a {src.describe()}, the target on a {grid.describe()}: give it on "
                         "the target's grid, or on a regular lat/lon grid (it is then averaged over each cell).")
    if np.isnan(out).any():
        raise ValueError(f"The {name} source does not cover the whole target grid.")
    return out


def get_static_fields(
    grid,
    names: Sequence[str] = STATIC_CHANNELS,
    *,
    sources: Mapping[str, object] | None = None,
    rename: Mapping[str, str] | None = None,
    regular_grid: bool = False,
) -> xr.Dataset:
    """Static channels on ``grid`` as an ``xr.Dataset`` with variables ``names`` on dims ``(lat, lon)``.

    Parameters
    ----------
    grid
        Target :class:`~dpdm_diffusers.grids.Grid` (or any xarray object with lat/lon dims). Any regular
        grid: global or regional, ascending or descending latitude, 0..360 or -180..180 longitude.
    names
        Channels to return, in order: ``"topography"`` (m) and/or ``"land_sea_mask"`` (0..1, 1 = land).
    sources
        Optional ``{name: path | xr.Dataset | xr.DataArray}`` with the user's own field on any regular
        grid (e.g. ERA5 ``z`` or ``lsm``, CMIP ``orog``/``sftlf``); other channels come from the
        packaged global sources.
    rename
        ``{name in your file: channel}`` (e.g. ``{"orog": "topography"}``) when the file's variable names are
        not recognised; common names (``orog``, ``z``, ``lsm``, ``sftlf``...) are found without it.
    regular_grid
        Put a near-regular (e.g. Gaussian) source grid on a regular one first (as for the data files).

    Raises
    ------
    ImportError
        When a packaged source is needed but the ``dpdm-diffusers[data]`` extra is not installed.
    """
    if not isinstance(grid, Grid):
        grid = Grid.from_xarray(grid)
    sources = dict(sources or {})
    unknown = [n for n in list(names) + list(sources) if n not in STATIC_CHANNELS]
    if unknown:
        raise ValueError(f"Unknown static channels {unknown}; available: {STATIC_CHANNELS}.")
    fields, origin = {}, {}
    for name in names:
        if name in sources:
            fields[name] = _user_field(sources[name], name, grid, rename, regular_grid)
            origin[name] = "user-provided, regridded to this grid"
        else:
            key = (np.ascontiguousarray(grid.lat, np.float64).tobytes(),
                   np.ascontiguousarray(grid.lon, np.float64).tobytes())
            fields[name] = _packaged_on_grid(name, *key, grid.mapping).copy()
            how = "averaged over each cell's footprint" if grid.mapping is not None else "area-averaged onto this grid"
            origin[name] = f"{_SOURCES[name][2]}, {how}"
    return static_dataset(grid, fields, origin)
