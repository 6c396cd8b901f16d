"""Regular lat/lon data (a GCM, a reanalysis) onto a rotated or projected grid: the step that puts the driving
model's field on a regional target's coarse native grid (``dpdm regrid``).

One job, with well-kept libraries: pyproj places the target's cells on Earth (:mod:`dpdm_diffusers.native_grids`),
xarray (scipy) interpolates bilinearly at their centres; the conservative variant averages each cell's footprint
(:func:`dpdm_diffusers.static_fields.footprint_mean`, the static fields' mechanism).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .grids import Grid, grid_dims
from .native_grids import axis_attrs

__all__ = ["REGRID_METHODS", "regrid_to_native"]

REGRID_METHODS = ("bilinear", "conservative")


def regrid_to_native(obj, grid: Grid, method: str = "bilinear"):
    """A regular lat/lon field (a GCM or reanalysis) on a rotated or projected grid ``grid``, e.g. the coarse native
    grid of a regional model's fine one (``coarse_grid(Grid.from_xarray(fine), factor)``).

    ``method``: ``"bilinear"`` interpolates at each cell centre (:meth:`xarray.Dataset.interp`, scipy's linear
    interpolation, at the centres placed by pyproj); ``"conservative"`` averages each cell's footprint (``k x k``
    points per cell, nearest source cell each, :func:`~dpdm_diffusers.static_fields.footprint_mean`), which keeps
    area means: use it for precipitation and whenever the source is finer than the target. Output has dims ``y``/``x``
    and the grid mapping, as :func:`dpdm_diffusers.data.standardize` gives; a target cell outside the source is refused, never filled.
    """
    if grid.mapping is None:
        raise ValueError("regrid_to_native needs a native (rotated or projected) target grid; use regrid for lat/lon.")
    if method not in REGRID_METHODS:
        raise ValueError(f"Unknown method {method!r} for a native target; expected one of {REGRID_METHODS}.")
    src = Grid.from_xarray(obj)
    if src.mapping is not None:
        raise ValueError(f"The source is already on a {src.describe()}: regrid_to_native reads regular lat/lon data.")
    la, lo = grid_dims(obj)
    lat2, lon2 = grid.geographic()
    lon_src = np.asarray(obj[lo].values, np.float64)
    lon2 = lon_src.min() + np.mod(lon2 - lon_src.min(), 360.0)  # the source's longitude convention
    if method == "bilinear":
        if src.periodic:  # one wrapped column, so centres between the last and first longitude are inside
            obj = xr.concat([obj, obj.isel({lo: [0]}).assign_coords({lo: [lon_src[0] + 360.0]})], dim=lo)
        at = {la: xr.DataArray(lat2, dims=("y", "x")), lo: xr.DataArray(lon2, dims=("y", "x"))}
        out = obj.interp(at, method="linear").drop_vars([la, lo], errors="ignore")
    else:
        from .static_fields import footprint_mean

        def one(da):  # every time step at once: the footprint points are placed once
            core = da.transpose(..., la, lo)
            dims = [d for d in core.dims if d not in (la, lo)]
            res = footprint_mean(core.values, src, grid, method="nearest").astype(np.float32)
            return xr.DataArray(res, dims=(*dims, "y", "x"), coords={d: core[d] for d in dims if d in core.coords},
                                attrs=da.attrs)

        out = xr.Dataset({k: one(v) for k, v in obj.data_vars.items()}, attrs=obj.attrs) if isinstance(
            obj, xr.Dataset) else one(obj)
    variables = list(out.data_vars) if isinstance(out, xr.Dataset) else [None]
    first = out.isel({d: 0 for d in out.dims if d not in ("y", "x")})  # cells outside the source: NaN at every step
    n_missing = sum(int(np.isnan(np.asarray((first[v] if v else first).values)).sum()) for v in variables)
    if n_missing:
        raise ValueError(f"{n_missing} cells of the {grid.describe()} lie outside the lat/lon source "
                         f"({src.describe()}): give a source that covers the whole target domain.")
    out = out.assign_coords(y=xr.Variable("y", grid.y, axis_attrs(grid.mapping, "y")),
                            x=xr.Variable("x", grid.x, axis_attrs(grid.mapping, "x")))
    out = out.assign_coords({grid.mapping.name: grid.mapping.variable()})
    for v in variables:
        target = out[v] if v else out
        target.attrs["grid_mapping"] = grid.mapping.name
    return out
