"""Regular grids: coordinate conventions, validation, refinement and interpolation.

A :class:`Grid` is regular lat/lon, or regular in its own coordinates (rotated pole, a projection) with a
:class:`~dpdm_diffusers.native_grids.GridMapping` that says where it lies on Earth: tiling, interpolation and block
means work on its axes the same way; only geography (static fields, area weights) asks the mapping.

Pure numpy/scipy (no file I/O). Interpolation uses :class:`scipy.interpolate.RegularGridInterpolator`
(linear = bilinear, cubic = bicubic spline) after padding the coarse grid by two cells (wrapping in
longitude on global grids, odd reflection elsewhere so the spline keeps the edge gradient). A fine grid
refined from a coarse one reaches half a coarse cell beyond the outer coarse centres; there values are
held at the edge value (as ``torch`` ``align_corners=False`` does), never extrapolated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .native_grids import GridMapping

# rotated `rlat`/`rlon` are never geographic: they are recognised only to be refused by check_geographic
LAT_NAMES = ("lat", "latitude", "nav_lat", "rlat", "y")
LON_NAMES = ("lon", "longitude", "nav_lon", "rlon", "x")
INTERPOLATIONS = {"bilinear": "linear", "bicubic": "cubic"}


def find_coord(obj, names, what: str) -> str:
    """Name of the first of ``names`` that ``obj`` (xarray object) has as a dimension."""
    for n in names:
        if n in obj.dims:
            return n
    raise ValueError(f"No {what} dimension found: expected one of {names}, got dims {tuple(obj.dims)}.")


def lat_lon_names(obj) -> tuple[str, str]:
    """Names of the latitude and longitude dims of a lat/lon grid; a grid with a CF grid mapping (whose ``rlat`` or
    ``y`` would otherwise be taken for latitude) is refused: :func:`grid_dims` names its axes."""
    from .native_grids import native_axes

    axes = native_axes(obj)
    if axes is not None:
        raise ValueError(f"The data are on a {axes.mapping.describe()}: its axes {axes.y!r}/{axes.x!r} are not "
                         "latitude/longitude, and this step needs a regular lat/lon grid.")
    names = find_coord(obj, LAT_NAMES, "latitude"), find_coord(obj, LON_NAMES, "longitude")
    check_geographic(obj, *names)  # a rotated or projected axis that lost its grid mapping is never read as degrees
    return names


def grid_dims(obj) -> tuple[str, str]:
    """Names of the (row, column) dims: the native axes of a grid with a CF grid mapping, else latitude/longitude."""
    from .native_grids import native_axes

    axes = native_axes(obj)
    return (axes.y, axes.x) if axes is not None else lat_lon_names(obj)


# 2-D coordinates under these names make a curvilinear grid, which is not a regular lat/lon grid
_CURVILINEAR_NAMES = ("lat", "latitude", "lon", "longitude", "nav_lat", "nav_lon")


def check_lat_lon(obj, lat_name: str | None, lon_name: str | None) -> None:
    """The grid checks every entry point shares (the data layer and the pipeline's processor): the named dims carry
    1-D coordinate values, and latitudes are degrees (a projected x/y in metres would pass for them otherwise)."""
    for name in _CURVILINEAR_NAMES:
        if name in obj.coords and obj[name].ndim > 1:
            raise ValueError(
                f"Curvilinear grid: coordinate `{name}` is {obj[name].ndim}-D {obj[name].dims}, and no CF grid_mapping "
                "says in which coordinates the grid is regular. A rotated-pole or projected grid (CORDEX, WRF) works "
                "once its grid_mapping variable is in the file; a grid regular in no coordinates must be regridded "
                "first (e.g. with xESMF)."
            )
    for name in (lat_name, lon_name):  # a dim without values would silently read as 0, 1, 2 ... degrees
        if name is not None and name not in obj.coords:
            raise ValueError(f"Dimension {name!r} has no coordinate values: not a lat/lon grid (assign degrees first).")
    check_geographic(obj, lat_name, lon_name)
    lat = np.asarray(obj[lat_name].values if lat_name is not None else [], dtype=np.float64)
    if lat.size and np.nanmax(np.abs(lat)) > 90 + 1e-6:
        raise ValueError(
            f"{lat_name!r} reaches {np.nanmax(np.abs(lat)):.4g}: not a lat/lon grid (projected x/y coordinates?); "
            "regrid to a regular lat/lon grid first."
        )


_ROTATED_STANDARD_NAMES = ("grid_latitude", "grid_longitude", "projection_x_coordinate", "projection_y_coordinate")


def check_geographic(obj, lat_name: str | None, lon_name: str | None) -> None:
    """Refuse a grid whose metadata says it is not geographic lat/lon: rotated-pole coordinates (``rlat``/``rlon``,
    standard names ``grid_latitude``/``grid_longitude``), projected x/y, a CF ``grid_mapping`` other than
    ``latitude_longitude``, or units that are not degrees. Taking them as geographic would put the static fields
    (and the result) in the wrong place on Earth, silently."""
    for name in (lat_name, lon_name):
        if name is None or name not in obj.coords:
            continue
        attrs = obj[name].attrs
        units = str(attrs.get("units", "")).strip().lower()
        rotated = attrs.get("standard_name") in _ROTATED_STANDARD_NAMES or name in ("rlat", "rlon")
        degrees = units.startswith("deg") or "°" in units  # degrees_north, degree_E, degrees N, °N ...
        if rotated or (units and not degrees) or (name in ("x", "y") and not units):
            raise ValueError(
                f"Coordinate {name!r} ({attrs.get('standard_name') or 'no standard_name'}, units {units or 'none'}) is "
                "not geographic latitude/longitude, and no CF grid_mapping variable says where the grid lies on Earth. "
                "Rotated-pole and projected grids (CORDEX, WRF, UKCP) work when the file carries one: add it (e.g. "
                "ds['rotated_pole'] = xr.DataArray(0, attrs={'grid_mapping_name': 'rotated_latitude_longitude', "
                "'grid_north_pole_latitude': ..., 'grid_north_pole_longitude': ...}) and set the variables' "
                "attribute grid_mapping='rotated_pole'), or regrid to a regular lat/lon grid.")
    variables = obj.data_vars.values() if hasattr(obj, "data_vars") else [obj]
    for var in variables:
        mapping = var.attrs.get("grid_mapping") or var.encoding.get("grid_mapping")
        if mapping and mapping in getattr(obj, "variables", {}):
            kind = obj[mapping].attrs.get("grid_mapping_name", "")
            if kind and kind != "latitude_longitude":
                raise ValueError(
                    f"Variable {var.name!r} is on a {kind!r} grid (grid_mapping {mapping!r}), but its dims "
                    f"{tuple(var.dims)} were read as latitude/longitude: name its axes as CF does (standard_name "
                    "grid_latitude/grid_longitude or projection_y/x_coordinate).")


def check_regular(values, name: str, rtol: float = 1e-3) -> float:
    """Check a 1-D coordinate is finite, strictly monotonic and evenly spaced; return its signed step.

    Coordinates stored as float32 may jitter by their rounding (a 0.0135-degree step near 360 has 3e-5 of it):
    that much is allowed on top of ``rtol``."""
    rounding = 8 * np.finfo(np.float32).eps if np.asarray(values).dtype == np.float32 else 0.0
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 2:
        raise ValueError(f"Coordinate `{name}` must be 1-D with at least 2 points, got shape {v.shape}.")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"Coordinate `{name}` contains NaN or inf.")
    d = np.diff(v)
    if np.any(d == 0):
        dup = v[1:][d == 0][:3]
        raise ValueError(f"Coordinate `{name}` has duplicated values, e.g. {dup.tolist()}.")
    if not (np.all(d > 0) or np.all(d < 0)):
        raise ValueError(f"Coordinate `{name}` is not monotonic (sort it first, e.g. `ds.sortby('{name}')`).")
    step = float(np.median(d))
    if np.max(np.abs(d - step)) > rtol * abs(step) + 1e-9 + rounding * np.abs(v).max():
        raise ValueError(
            f"Coordinate `{name}` is irregular (spacing {d.min():.6g} .. {d.max():.6g}); "
            "regrid to a regular lat/lon grid first."
        )
    return step


def is_global_lon(lon) -> bool:
    """True when a regular longitude axis covers the full circle (so it is periodic)."""
    lon = np.asarray(lon, dtype=np.float64)
    step = abs(float(np.median(np.diff(lon))))
    return bool(abs(step * lon.size - 360.0) < 0.5 * step)


def refine(coord, factor: int) -> np.ndarray:
    """Split each cell of a regular axis into ``factor`` cells; returns the fine cell centres."""
    c = np.asarray(coord, dtype=np.float64)
    step = float(np.median(np.diff(c)))
    offsets = (np.arange(factor) + 0.5) / factor - 0.5
    return (c[:, None] + offsets[None, :] * step).reshape(-1)


@dataclass(frozen=True)
class Grid:
    """A regular grid of cell centres. Either axis may be descending.

    Without ``mapping``, ``lat``/``lon`` are geographic degrees. With a
    :class:`~dpdm_diffusers.native_grids.GridMapping`, they are the grid's own row and column axes (rotated degrees,
    or projection metres/km): ``y``/``x`` name them so, and :meth:`geographic` gives the cells' latitude/longitude.
    """

    lat: np.ndarray
    lon: np.ndarray
    mapping: GridMapping | None = None

    def __post_init__(self):
        object.__setattr__(self, "lat", np.asarray(self.lat, dtype=np.float64))
        object.__setattr__(self, "lon", np.asarray(self.lon, dtype=np.float64))
        check_regular(self.lat, "lat")
        check_regular(self.lon, "lon")

    @property
    def shape(self) -> tuple[int, int]:
        return self.lat.size, self.lon.size

    @property
    def dlat(self) -> float:
        return abs(float(np.median(np.diff(self.lat))))

    @property
    def dlon(self) -> float:
        return abs(float(np.median(np.diff(self.lon))))

    @property
    def periodic(self) -> bool:
        # a native grid never wraps (a global rotated grid would, but regional models are what use them)
        return self.mapping is None and is_global_lon(self.lon)

    @property
    def native(self) -> bool:
        return self.mapping is not None

    @property
    def y(self) -> np.ndarray:
        return self.lat

    @property
    def x(self) -> np.ndarray:
        return self.lon

    def geographic(self) -> tuple[np.ndarray, np.ndarray]:
        """2-D ``(lat, lon)`` of the cell centres in degrees."""
        if self.mapping is None:
            return tuple(np.meshgrid(self.lat, self.lon, indexing="ij"))
        from .native_grids import geographic_centres

        return geographic_centres(self.mapping, self.lat, self.lon)

    def same_cells(self, other: Grid) -> bool:
        """Whether ``other`` has the same mapping and cell centres (either order, to a thousandth of a cell)."""
        return (self.mapping == other.mapping and self.shape == other.shape
                and np.allclose(np.sort(self.lat), np.sort(other.lat), atol=1e-3 * self.dlat)
                and np.allclose(np.sort(self.lon), np.sort(other.lon), atol=1e-3 * self.dlon))

    def describe(self) -> str:
        kind = "lat/lon grid" if self.mapping is None else self.mapping.describe()
        return f"{self.shape[0]}x{self.shape[1]} {kind}"

    def refine(self, factor: int) -> Grid:
        lat = refine(self.lat, factor)
        if self.mapping is not None:
            return Grid(lat, refine(self.lon, factor), self.mapping)
        if factor > 1 and np.abs(lat).max() > 90 + 1e-6:
            raise ValueError(
                f"The grid has cells centred on a pole (latitude {self.lat[np.argmax(np.abs(self.lat))]:g}): split "
                f"{factor} ways, their fine cells would lie beyond the pole. Drop the pole rows first, e.g. "
                "ds.sel(lat=slice(-89.9, 89.9)) (they are half cells on such grids), or regrid to cell-centred latitudes.")
        return Grid(lat, refine(self.lon, factor))

    def scale_factor_to(self, fine: Grid) -> float:
        """Ratio of this grid's spacing to ``fine``'s, checked to be the same in lat and lon."""
        fy, fx = self.dlat / fine.dlat, self.dlon / fine.dlon
        if abs(fy - fx) > 1e-3 * max(fy, fx):
            raise ValueError(f"Grid refinement differs between lat ({fy:.4g}) and lon ({fx:.4g}).")
        return fy

    @classmethod
    def from_xarray(cls, obj) -> Grid:
        """The grid of an xarray object: native (its CF grid mapping's axes) or regular lat/lon."""
        from .native_grids import native_axes

        axes = native_axes(obj)
        if axes is not None:
            return cls(obj[axes.y].values, obj[axes.x].values, axes.mapping)
        la, lo = lat_lon_names(obj)
        return cls(obj[la].values, obj[lo].values)


def area_weights(grid: Grid) -> np.ndarray:
    """Relative cell areas ``(ny, nx)`` of a grid: ``cos(lat)`` on lat/lon and rotated grids (in their own latitude),
    equal on a projected grid (the projection's scale varies a few per cent across a regional domain)."""
    if grid.mapping is not None and not grid.mapping.rotated:
        return np.ones(grid.shape)
    return np.broadcast_to(np.cos(np.deg2rad(grid.lat)).clip(min=0.0)[:, None], grid.shape).copy()


def contiguous_longitude(ds, lat_name: str, lon_name: str):
    """A region across the dateline given in -180..180 (or across Greenwich in 0..360) is a regular grid in the other
    convention: use that (the output's longitudes are then continuous, e.g. 170..190) instead of refusing."""
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


def _unwrap_lon(target_lon: np.ndarray, src_lon: np.ndarray) -> np.ndarray:
    """Shift target longitudes by multiples of 360 into the source's range (mixed conventions)."""
    lo = src_lon.min()
    return lo + np.mod(target_lon - lo, 360.0)


def interpolation_methods(interpolation, num_variables: int) -> list[str]:
    """One interpolation per variable from a model's ``interpolation`` (one name for all, or a list of them)."""
    methods = [interpolation] * num_variables if isinstance(interpolation, str) else list(interpolation)
    if len(methods) != num_variables:
        raise ValueError(f"interpolation has {len(methods)} entries for {num_variables} variables.")
    unknown = [m for m in methods if m not in INTERPOLATIONS]
    if unknown:
        raise ValueError(f"Unknown interpolation {unknown[0]!r}; expected one of {tuple(INTERPOLATIONS)}.")
    return methods


def interpolate_variables(values: np.ndarray, src: Grid, dst: Grid, methods) -> np.ndarray:
    """:func:`interpolate` of ``(..., V, lat, lon)`` with each variable's own method (:func:`interpolation_methods`),
    e.g. bicubic for temperature and bilinear for a precipitation field whose bicubic overshoot must never exist."""
    values = np.asarray(values)
    methods = interpolation_methods(methods, values.shape[-3])
    if len(set(methods)) == 1:
        return interpolate(values, src, dst, methods[0])
    return np.stack([interpolate(values[..., i, :, :], src, dst, m) for i, m in enumerate(methods)], axis=-3)


def interpolate(values: np.ndarray, src: Grid, dst: Grid, method: str = "bilinear") -> np.ndarray:
    """Interpolate ``values`` of shape ``(..., src.lat, src.lon)`` onto ``dst``.

    ``method`` is ``"bilinear"`` or ``"bicubic"``. Longitude wraps on global source grids; outside the
    source's cell centres values are held at the edge (never extrapolated). NaN propagates to every
    target point whose stencil touches it.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"Unknown interpolation {method!r}; expected one of {tuple(INTERPOLATIONS)}.")
    from scipy.interpolate import RegularGridInterpolator

    values = np.asarray(values)
    if values.shape[-2:] != src.shape:
        raise ValueError(f"Values of shape {values.shape} do not match the source grid {src.shape}.")
    missing = np.isnan(values) if np.issubdtype(values.dtype, np.floating) else None
    if missing is not None and missing.any():
        # Splines need finite input everywhere (scipy refuses NaN): interpolate a copy with each gap filled
        # from its nearest valid cell, then mask every target point whose bilinear stencil touches a gap,
        # so bilinear and bicubic give the same mask and no filled value leaks out as data.
        out = interpolate(_fill_nearest(values, missing), src, dst, method)
        touched = interpolate(missing.astype(np.float32), src, dst, "bilinear") > 1e-6
        out[touched] = np.nan
        return out
    lat, lon = src.lat, src.lon
    if lat[0] > lat[-1]:
        lat, values = lat[::-1], values[..., ::-1, :]
    if lon[0] > lon[-1]:
        lon, values = lon[::-1], values[..., ::-1]
    pad = 2
    dlat, dlon = src.dlat, src.dlon
    lat_p = np.concatenate([lat[0] - dlat * np.arange(pad, 0, -1), lat, lat[-1] + dlat * np.arange(1, pad + 1)])
    lon_p = np.concatenate([lon[0] - dlon * np.arange(pad, 0, -1), lon, lon[-1] + dlon * np.arange(1, pad + 1)])
    # odd reflection continues the local gradient, so the cubic spline stays exact for linear fields
    edge = dict(mode="reflect", reflect_type="odd")
    width = [(0, 0)] * (values.ndim - 2)
    v = np.pad(values, width + [(pad, pad), (0, 0)], **edge)
    v = np.pad(v, width + [(0, 0), (pad, pad)], **({"mode": "wrap"} if src.periodic else edge))

    tlat = np.clip(dst.lat, lat[0], lat[-1])  # hold at the edge beyond the outer centres
    tlon = _unwrap_lon(dst.lon, lon_p) if src.periodic else np.clip(dst.lon, lon[0], lon[-1])
    if not src.periodic and (dst.lon.max() > lon[-1] + dlon or dst.lon.min() < lon[0] - dlon):
        raise ValueError("Target longitudes extend beyond the low-res domain by more than one cell.")
    if dst.lat.max() > lat[-1] + dlat or dst.lat.min() < lat[0] - dlat:
        raise ValueError("Target latitudes extend beyond the low-res domain by more than one cell.")

    # RegularGridInterpolator wants the grid axes first and batch axes last.
    batch = v.shape[:-2]
    v = np.moveaxis(v.reshape(-1, *v.shape[-2:]), 0, -1)
    interp = RegularGridInterpolator((lat_p, lon_p), v, method=INTERPOLATIONS[method], bounds_error=True)
    yy, xx = np.meshgrid(tlat, tlon, indexing="ij")
    out = interp(np.stack([yy.ravel(), xx.ravel()], axis=-1))  # (H*W, B)
    out = np.moveaxis(out, -1, 0).reshape(*batch, *dst.shape)
    return out.astype(values.dtype, copy=False)


def _fill_nearest(values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Each NaN of every 2-D field replaced by its nearest valid value (all-NaN fields become 0)."""
    from scipy.ndimage import distance_transform_edt

    flat = values.reshape(-1, *values.shape[-2:]).copy()
    gaps = missing.reshape(flat.shape)
    for k in range(flat.shape[0]):
        if gaps[k].all():
            flat[k] = 0.0
        elif gaps[k].any():
            _, (iy, ix) = distance_transform_edt(gaps[k], return_indices=True)
            flat[k] = flat[k][iy, ix]
    return flat.reshape(values.shape)


def block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    """Coarsen ``(..., H, W)`` by the mean over ``factor x factor`` blocks (H, W divisible by factor)."""
    h, w = values.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"Grid {h}x{w} is not divisible by the coarsening factor {factor}.")
    v = values.reshape(*values.shape[:-2], h // factor, factor, w // factor, factor)
    return v.mean(axis=(-3, -1))
