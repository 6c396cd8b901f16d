"""Grids regular in their own coordinates: rotated pole (CORDEX, UKCP) and projections (Lambert conformal, polar
stereographic; WRF, CORDEX ML-Bench), described by a CF ``grid_mapping`` variable.

One job: read what the CF metadata says about a grid and say where its cells lie on Earth. The coordinate reference
system is pyproj's (``pyproj.CRS.from_cf``), never hand-written projection maths. Such a grid is regular in its own
axes (rotated degrees, or projection metres), so everything that works on index grids (tiling, interpolation of the
coarse field, block means) works on it unchanged; only what needs geography (static fields, area weights, output
``lat``/``lon``) asks :class:`GridMapping` for it.

Inside the data layer the native axes are called ``y``/``x`` (``lat``/``lon`` are only ever geographic); output
gives back the file's own names, its ``grid_mapping`` variable and 2-D ``lat``/``lon`` auxiliary coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

# CF standard names of the native axes, then common dim names of files that leave them out
Y_STANDARD_NAMES = ("grid_latitude", "projection_y_coordinate")
X_STANDARD_NAMES = ("grid_longitude", "projection_x_coordinate")
Y_NAMES = ("rlat", "y", "grid_latitude", "south_north", "projection_y_coordinate")
X_NAMES = ("rlon", "x", "grid_longitude", "west_east", "projection_x_coordinate")
# (metres per unit) of projected axes; rotated axes are degrees
_LENGTH_UNITS = {"m": 1.0, "meter": 1.0, "metre": 1.0, "meters": 1.0, "metres": 1.0, "km": 1000.0,
                 "kilometer": 1000.0, "kilometre": 1000.0, "kilometers": 1000.0, "kilometres": 1000.0}
# descriptive attributes of a grid-mapping variable: not part of the CRS (two files that differ only in them are on
# the same grid); crs_wkt/spatial_ref repeat the CF parameters in another form
_NOT_CRS = {"long_name", "comment", "description", "crs_wkt", "spatial_ref", "proj4", "proj4text", "GeoTransform"}
LAT_ATTRS = {"standard_name": "latitude", "units": "degrees_north", "long_name": "latitude"}
LON_ATTRS = {"standard_name": "longitude", "units": "degrees_east", "long_name": "longitude"}


def _hashable(value):
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass(frozen=True)
class GridMapping:
    """A CF grid mapping: how a grid regular in its own coordinates lies on Earth.

    Args:
        name: the grid-mapping variable's name in the file (e.g. ``"rotated_latitude_longitude"``, ``"crs"``); not
            compared: two files that name the same mapping differently are on the same grid.
        attrs: its CF attributes, as sorted ``(key, value)`` pairs (hashable, so grids can be cache keys).
        axis_scale: metres per unit of the projection axes (1 for metres, 1000 for km); 1 for rotated degrees.
    """

    name: str = field(compare=False)
    attrs: tuple
    axis_scale: float = 1.0

    @classmethod
    def from_attrs(cls, name: str, attrs, axis_units: str = "") -> GridMapping:
        items = tuple(sorted((str(k), _hashable(v)) for k, v in dict(attrs).items()
                             if not str(k).startswith("_") and k not in _NOT_CRS))
        mapping = cls(str(name), items, 1.0)
        if not mapping.rotated:
            unit = str(axis_units or "m").strip().lower()
            if unit not in _LENGTH_UNITS:
                raise ValueError(f"Projection axes in {axis_units!r}: expected metres or km (CF units of "
                                 f"projection_x_coordinate), for the {mapping.kind!r} grid mapping {name!r}.")
            mapping = cls(str(name), items, _LENGTH_UNITS[unit])
        mapping.crs  # noqa: B018 - read it now: a mapping pyproj cannot read is refused at once, by name
        return mapping

    @property
    def kind(self) -> str:
        return str(dict(self.attrs).get("grid_mapping_name", ""))

    @property
    def rotated(self) -> bool:
        return self.kind == "rotated_latitude_longitude"

    @property
    def crs(self):
        return _crs(self)

    def to_geographic(self, y, x) -> tuple[np.ndarray, np.ndarray]:
        """Geographic ``(lat, lon)`` in degrees (longitude -180..180) of native points ``(y, x)``."""
        forward, _ = _transformers(self)
        lon, lat = forward.transform(np.asarray(x, np.float64) * self.axis_scale, np.asarray(y, np.float64) * self.axis_scale)
        return np.asarray(lat), (np.asarray(lon) + 180.0) % 360.0 - 180.0

    def from_geographic(self, lat, lon) -> tuple[np.ndarray, np.ndarray]:
        """Native ``(y, x)`` of geographic points, as pyproj gives them (rotated longitudes in -180..180)."""
        _, inverse = _transformers(self)
        x, y = inverse.transform(np.asarray(lon, np.float64), np.asarray(lat, np.float64))
        return np.asarray(y) / self.axis_scale, np.asarray(x) / self.axis_scale

    def variable(self):
        """The grid-mapping variable for output (a scalar int with the CF attributes, as CF writes it)."""
        import xarray as xr

        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.attrs}
        attrs.setdefault("long_name", f"coordinate reference system ({self.kind})")
        return xr.Variable((), np.int32(0), attrs)

    def describe(self) -> str:
        return f"{self.kind} grid (grid_mapping {self.name!r})"


@lru_cache(maxsize=32)
def _crs(mapping: GridMapping):
    import pyproj

    attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in mapping.attrs}
    try:
        return pyproj.CRS.from_cf(attrs)
    except pyproj.exceptions.CRSError as err:
        raise ValueError(
            f"The CF grid mapping {mapping.name!r} ({mapping.kind or 'no grid_mapping_name'}) cannot be read by pyproj: "
            f"{err}. Check its attributes against the CF conventions (appendix F), or regrid the data to a regular "
            "lat/lon grid first.") from None


@lru_cache(maxsize=32)
def _transformers(mapping: GridMapping):
    import pyproj

    crs = mapping.crs
    # the base geographic CRS (a rotated pole's `geodetic_crs` is the rotated one itself: no transform at all)
    geographic = crs.source_crs or crs.geodetic_crs
    return (pyproj.Transformer.from_crs(crs, geographic, always_xy=True),
            pyproj.Transformer.from_crs(geographic, crs, always_xy=True))


# ----------------------------------------------------------------------------------------------
# reading CF metadata
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NativeAxes:
    """What a file's CF metadata says about a native grid: its axis dims and its mapping."""

    y: str
    x: str
    mapping: GridMapping


def _variables(obj) -> dict:
    """Every variable of a Dataset; the coordinates of a DataArray (where its grid mapping travels)."""
    return dict(obj.variables) if hasattr(obj, "data_vars") else dict(obj.coords)


def _mapping_variable(obj) -> str | None:
    """Name of the grid-mapping variable the data variables point to (or, when their ``grid_mapping`` attribute
    was lost on the way, the one variable that carries ``grid_mapping_name``)."""
    variables = list(obj.data_vars.values()) if hasattr(obj, "data_vars") else [obj]
    for var in variables:
        ref = var.attrs.get("grid_mapping") or var.encoding.get("grid_mapping")
        if ref:
            return str(ref).split(":")[0].split()[0]  # CF also allows "name: coord1 coord2"
    carriers = [str(k) for k, v in _variables(obj).items() if "grid_mapping_name" in v.attrs]
    return carriers[0] if carriers else None


def _axis(obj, standard_names, names, axis: str | None = None) -> str | None:
    for d in obj.dims:
        attrs = obj[d].attrs if d in obj.coords else {}
        if attrs.get("standard_name") in standard_names or (axis is not None and attrs.get("axis") == axis):
            return str(d)
    for n in names:
        if n in obj.dims:
            return n
    return None


def native_axes(obj) -> NativeAxes | None:
    """The native axes and mapping of a grid described by a CF ``grid_mapping`` (``None`` for lat/lon data).

    Raises ``ValueError`` naming the grid when a mapping is declared but cannot work: its variable is missing, pyproj
    cannot read it, or the data have no 1-D axes regular in its coordinates (a curvilinear grid).
    """
    name = _mapping_variable(obj)
    if name is None:
        return None
    holder = _variables(obj)
    if name not in holder:
        if _axis(obj, Y_STANDARD_NAMES, Y_NAMES) is None:
            return None  # a lat/lon DataArray whose (latitude_longitude) mapping stayed in its Dataset
        raise ValueError(f"The data point to the CF grid mapping {name!r}, but no variable of that name is present: "
                         f"keep it when selecting a variable (ds.set_coords({name!r})[var], or pass the Dataset).")
    attrs = dict(holder[name].attrs)
    kind = attrs.get("grid_mapping_name", "")
    if kind in ("latitude_longitude", ""):
        return None
    y = _axis(obj, Y_STANDARD_NAMES, Y_NAMES, "Y")
    x = _axis(obj, X_STANDARD_NAMES, X_NAMES, "X")
    if y is None or x is None or y not in obj.coords or x not in obj.coords or obj[y].ndim != 1 or obj[x].ndim != 1:
        raise ValueError(
            f"The data are on a {kind!r} grid (grid_mapping {name!r}) but have no 1-D axes in its coordinates among "
            f"dims {tuple(obj.dims)}. Name them as CF does (standard_name grid_latitude/grid_longitude or "
            "projection_y_coordinate/projection_x_coordinate, with their values); a curvilinear grid that is regular in "
            "no coordinates must be regridded to a regular lat/lon or projected grid first (e.g. xESMF or pyresample).")
    units = str(obj[x].attrs.get("units", ""))
    return NativeAxes(y, x, GridMapping.from_attrs(name, attrs, units))


def native_grid(attrs, y, x, name: str = "crs", axis_units: str = "m"):
    """A :class:`~dpdm_diffusers.grids.Grid` regular in the coordinates of the CF grid mapping ``attrs`` (e.g. a
    Lambert conformal domain built for a benchmark): ``y``/``x`` are its cell centres, in degrees for a rotated pole
    and ``axis_units`` (metres or km) for a projection."""
    from .grids import Grid

    return Grid(np.asarray(y, np.float64), np.asarray(x, np.float64), GridMapping.from_attrs(name, attrs, axis_units))


_GEOGRAPHIC_2D = ("lat", "lon", "latitude", "longitude", "nav_lat", "nav_lon")


def standardize_native(obj, axes: NativeAxes, time_aliases=("valid_time",)):
    """:func:`dpdm_diffusers.data.standardize` for a grid with a CF grid mapping: axes ``y``/``x`` ascending and
    exactly regular (float32 jitter removed), the mapping variable a coordinate (and every field's ``grid_mapping``),
    the 2-D lat/lon checked against it and dropped (they are rebuilt on output), the first of ``time_aliases``
    present renamed ``time``."""
    import xarray as xr

    from .grids import check_regular

    check_geographic_coords(obj, axes)
    names = obj.variables if isinstance(obj, xr.Dataset) else obj.coords
    drop = [n for n in _GEOGRAPHIC_2D if n in names and obj[n].ndim == 2]
    obj = obj.drop_vars(drop)
    if isinstance(obj, xr.Dataset) and axes.mapping.name in obj.data_vars:
        obj = obj.set_coords(axes.mapping.name)
    rename = {a: b for a, b in ((axes.y, "y"), (axes.x, "x")) if a != b}
    if "time" not in obj.dims:
        alias = next((t for t in time_aliases if t in obj.dims), None)
        if alias:
            rename[alias] = "time"
    names = obj.variables if isinstance(obj, xr.Dataset) else obj.coords
    clash = [new for new in rename.values() if new in names and new not in obj.dims]
    obj = obj.drop_vars(clash).rename(rename)
    for d in ("y", "x"):
        v = np.asarray(obj[d].values)
        if v.size > 1 and v[1] < v[0]:
            obj = obj.isel({d: slice(None, None, -1)})
        v = obj[d].values
        step = check_regular(v, f"{d} ({axes.y if d == 'y' else axes.x})")
        exact = float(v[0]) + step * np.arange(v.size)  # float32 axes jitter by their rounding; the grid does not
        obj = obj.assign_coords({d: xr.Variable(d, exact, obj[d].attrs)})
    if isinstance(obj, xr.Dataset):
        for v in obj.data_vars:
            if {"y", "x"} <= set(obj[v].dims):
                obj[v].encoding.pop("grid_mapping", None)
                obj[v].attrs["grid_mapping"] = axes.mapping.name
    else:
        obj.encoding.pop("grid_mapping", None)
        obj.attrs["grid_mapping"] = axes.mapping.name
    if "time" in obj.dims and obj.sizes["time"] > 1 and "time" in obj.indexes:
        if not obj.indexes["time"].is_monotonic_increasing:
            obj = obj.sortby("time")
    return obj


# ----------------------------------------------------------------------------------------------
# geography of a native grid
# ----------------------------------------------------------------------------------------------
def geographic_centres(mapping: GridMapping, y, x) -> tuple[np.ndarray, np.ndarray]:
    """2-D ``(lat, lon)`` of the cell centres of the grid with 1-D axes ``y``, ``x`` (memoised: a streamed run asks
    for the same grid's once per chunk)."""
    y, x = np.ascontiguousarray(y, np.float64), np.ascontiguousarray(x, np.float64)
    lat, lon = _centres(mapping, y.tobytes(), x.tobytes())
    return lat.copy(), lon.copy()


@lru_cache(maxsize=16)
def _centres(mapping: GridMapping, y_key: bytes, x_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.meshgrid(np.frombuffer(y_key), np.frombuffer(x_key), indexing="ij")
    return mapping.to_geographic(yy, xx)


def footprint_points(mapping: GridMapping, y, x, per_cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Geographic ``(lat, lon)`` of ``per_cell x per_cell`` evenly spread points inside each cell, shaped
    ``(ny, per_cell, nx, per_cell)``: the quadrature of an area average over each cell's footprint on Earth
    (a cell's points stand for equal native areas; conformal maps keep that to the scale factor's variation across
    one cell)."""
    from .grids import refine

    # not memoised (geographic_centres is): per_cell**2 points per cell, needed once per static field or regrid
    yy, xx = np.meshgrid(refine(y, per_cell), refine(x, per_cell), indexing="ij")
    return mapping.to_geographic(yy, xx)


def check_geographic_coords(obj, axes: NativeAxes, tolerance_cells: float = 0.5) -> None:
    """Where a file also carries 2-D ``lat``/``lon``, they must be where its grid mapping puts the cells: a
    mapping with the wrong pole or origin would otherwise put the static fields (and the result) elsewhere."""
    names = [(a, b) for a, b in (("lat", "lon"), ("latitude", "longitude"), ("nav_lat", "nav_lon"))
             if a in obj.coords and b in obj.coords and obj[a].ndim == 2]
    if not names:
        return
    la, lo = names[0]
    lat2 = obj[la].transpose(axes.y, axes.x).values
    lon2 = obj[lo].transpose(axes.y, axes.x).values
    # compare a sparse sample of points (the corners and the middle): pyproj on every point of a large grid is slow
    ny, nx = lat2.shape
    iy = np.unique([0, ny // 2, ny - 1])
    ix = np.unique([0, nx // 2, nx - 1])
    y = np.asarray(obj[axes.y].values, np.float64)[iy]
    x = np.asarray(obj[axes.x].values, np.float64)[ix]
    lat, lon = geographic_centres(axes.mapping, y, x)
    got_lat, got_lon = lat2[np.ix_(iy, ix)], lon2[np.ix_(iy, ix)]
    dlon = np.abs((got_lon - lon + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(lat))
    err_deg = float(np.nanmax(np.hypot(got_lat - lat, dlon)))
    # one cell in degrees of arc (a projected step in metres over the metres in a degree)
    step = np.abs(np.diff(np.asarray(obj[axes.x].values[:2], np.float64)))[0] * axes.mapping.axis_scale
    cell_deg = step if axes.mapping.rotated else step / 111_195.0
    if err_deg > tolerance_cells * cell_deg + 1e-3:
        raise ValueError(
            f"The file's 2-D {la}/{lo} disagree with its grid mapping {axes.mapping.name!r} ({axes.mapping.kind}) by "
            f"up to {err_deg:.3g} degrees (a cell is about {cell_deg:.3g}): the mapping's parameters (pole, origin, "
            "standard parallels) or the axis units are wrong. Fix the grid_mapping attributes.")


def axis_attrs(mapping: GridMapping, axis: str) -> dict:
    """CF attributes of a native axis (``axis`` ``"y"`` or ``"x"``) for grids built here."""
    if mapping.rotated:
        return {"standard_name": "grid_latitude" if axis == "y" else "grid_longitude", "units": "degrees",
                "axis": axis.upper()}
    return {"standard_name": f"projection_{axis}_coordinate", "units": "m" if mapping.axis_scale == 1 else "km",
            "axis": axis.upper()}


def box_slices(lat2, lon2, lat=None, lon=None) -> tuple[slice, slice]:
    """Row and column slices of the smallest block of cells holding every cell whose centre (2-D ``lat2``/``lon2``)
    lies in the box ``lat=(south, north)``, ``lon=(west, east)`` (read eastwards from ``west``, any convention)."""
    inside = np.ones(np.shape(lat2), dtype=bool)
    if lat is not None:
        south, north = sorted(float(v) for v in lat)
        inside &= (lat2 >= south - 1e-9) & (lat2 <= north + 1e-9)
    if lon is not None:
        west, east = float(lon[0]), float(lon[1])
        inside &= ((lon2 - west) % 360.0) <= ((east - west) % 360.0 or 360.0) + 1e-9
    rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
    if rows.size == 0 or cols.size == 0:
        raise ValueError(f"The box lat={lat}, lon={lon} holds no cell centre of the grid (it spans lat "
                         f"{np.min(lat2):.4g} .. {np.max(lat2):.4g}, lon {np.min(lon2):.4g} .. {np.max(lon2):.4g}).")
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def output_coords(grid, y_name: str, x_name: str, y_attrs=None, x_attrs=None) -> dict:
    """Spatial coordinates of ``grid`` (a :class:`~dpdm_diffusers.grids.Grid`) for output, under the caller's dim
    names: the 1-D axes with the caller's attributes; on a native grid also 2-D geographic ``lat``/``lon`` (CF
    auxiliary coordinates) and the grid-mapping variable, so CF tools read the result as they read the input."""
    import xarray as xr

    mapping, y, x = grid.mapping, grid.lat, grid.lon
    if mapping is None:
        return {y_name: xr.Variable(y_name, y, dict(y_attrs or {})), x_name: xr.Variable(x_name, x, dict(x_attrs or {}))}
    lat, lon = geographic_centres(mapping, y, x)
    return {
        # the input's attributes, completed with what CF readers use to recognise the axes
        y_name: xr.Variable(y_name, np.asarray(y, np.float64), {**axis_attrs(mapping, "y"), **dict(y_attrs or {})}),
        x_name: xr.Variable(x_name, np.asarray(x, np.float64), {**axis_attrs(mapping, "x"), **dict(x_attrs or {})}),
        "lat": xr.Variable((y_name, x_name), lat, dict(LAT_ATTRS)),
        "lon": xr.Variable((y_name, x_name), lon, dict(LON_ATTRS)),
        mapping.name: mapping.variable(),
    }
