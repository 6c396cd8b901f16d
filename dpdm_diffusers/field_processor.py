"""FieldProcessor: the pipeline's way in from, and back out to, the caller's conventions.

In the spirit of diffusers' ``VaeImageProcessor`` and Aurora's typed batch metadata: :meth:`FieldProcessor.preprocess`
turns xarray or array input into physical values ``(B, V, h, w)`` on ascending grids plus a frozen
:class:`FieldLayout` that records everything needed to give the result back (names, dim order, longitude convention,
latitude order, batch dims, variable names); :meth:`FieldProcessor.postprocess` undoes it. The pipeline itself only
sees canonical arrays. Normalisation to model space is not done here (that is :class:`~dpdm_diffusers.transforms.
Normalizer`'s job): inputs and outputs of this class are in physical units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dpdm_diffusers.cf_attrs import clean_cf, output_attrs
from dpdm_diffusers.grids import Grid, check_lat_lon, contiguous_longitude, grid_dims, lat_lon_names
from dpdm_diffusers.naming import apply_variable_map
from dpdm_diffusers.native_grids import check_geographic_coords, native_axes, output_coords
from dpdm_diffusers.seeding import position_keys, sample_keys
from dpdm_diffusers.transforms import forward_transform

NAN_POLICIES = ("raise", "mask")


@dataclass(frozen=True)
class FieldLayout:
    """How the caller's input was laid out, so that output is given back the same way.

    Args:
        kind: ``"array"``, ``"dataset"`` or ``"dataarray"``.
        tensor: array input was a ``torch.Tensor`` (the default output type is then ``"pt"``).
        sample_keys: one key per sample (:func:`dpdm_diffusers.seeding.sample_keys`), which seeds its noise.
        template: the (renamed, sorted) input Dataset whose coordinates and attributes the output carries.
        lat_name, lon_name: the caller's names of the spatial dims (a native grid's y and x axes).
        batch_dims, batch_shape: the non-spatial dims of the input (e.g. ``("time",)``) and their sizes.
        lat_descending, lon_descending: the caller's coordinate order.
        lon_base: the western edge of the caller's longitude convention for global grids (``None`` otherwise).
        rename_back: model variable name -> the caller's (``variable_map`` inverted).
    """

    kind: str
    tensor: bool = False
    sample_keys: tuple[str, ...] = ()
    template: Any = None
    lat_name: str = "lat"
    lon_name: str = "lon"
    batch_dims: tuple[str, ...] = ()
    batch_shape: tuple[int, ...] = ()
    lat_descending: bool = False
    lon_descending: bool = False
    lon_base: float | None = None
    rename_back: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_array(self) -> bool:
        return self.kind == "array"


@dataclass(frozen=True)
class PreparedFields:
    """Canonical input of one call: physical values ``(B, V, h, w)`` on ``src``, static fields ``(S, H, W)`` on
    ``dst`` (ascending grids), and the layout to restore."""

    values: np.ndarray
    src: Grid
    dst: Grid
    static: np.ndarray | None
    layout: FieldLayout

    @property
    def periodic(self) -> bool:
        """Wrap tiles in longitude: a global grid with coordinates (arrays carry none)."""
        return self.src.periodic and not self.layout.is_array


class FieldProcessor:
    """Validates and canonicalises inputs, and packages outputs, for a model with the given variables and statics.

    Args:
        variables, units, transforms: the model's variables in channel order, their units and transforms.
        norm_mean, norm_std: per-variable statistics in transformed space (for the range check).
        static_channels: names of the model's static fields.
        scale_factor: grid refinement from the low-res to the high-res grid.
        dry_threshold: per variable, the amount (in the variable's units) below which output is set to exactly 0
            (precipitation's "dry"); 0 keeps every value.
    """

    def __init__(self, variables: Sequence[str], units: Sequence[str], transforms: Sequence[str],
                 norm_mean: Sequence[float], norm_std: Sequence[float], static_channels: Sequence[str],
                 scale_factor: int, dry_threshold: Sequence[float] | None = None):
        self.variables = list(variables)
        self.units = list(units)
        self.transforms = list(transforms)
        self.norm_mean = list(norm_mean)
        self.norm_std = list(norm_std)
        self.static_channels = list(static_channels)
        self.scale_factor = int(scale_factor)
        self.dry_threshold = [float(x) for x in dry_threshold] if dry_threshold else [0.0] * len(self.variables)

    @classmethod
    def from_config(cls, config: Mapping) -> FieldProcessor:
        keys = ("variables", "units", "transforms", "norm_mean", "norm_std", "static_channels", "scale_factor")
        return cls(**{k: config[k] for k in keys}, dry_threshold=config.get("dry_threshold"))

    # ------------------------------------------------------------------------------------------
    # in
    # ------------------------------------------------------------------------------------------
    def preprocess(self, low_res, static_fields=None, target_grid=None, member_dim: str = "member",
                   nan_policy: str = "raise", variable_map: Mapping[str, str] | None = None) -> PreparedFields:
        """Bring ``low_res`` and the static fields to canonical form (see :meth:`DownscalingPipeline.__call__` for
        the accepted types); every problem with the input is refused here, with a message that names it."""
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"Unknown nan_policy {nan_policy!r}; expected one of {NAN_POLICIES}.")
        if isinstance(low_res, (torch.Tensor, np.ndarray)):
            values, src, layout = self._from_array(low_res)
        else:
            values, src, layout = self._from_xarray(low_res, member_dim, variable_map)
        values = values.astype(np.float32, copy=False)
        n_nan = int(np.isnan(values).sum())
        if n_nan and nan_policy == "raise":
            raise ValueError(
                f"The low-res input contains {n_nan} NaN values. Fill them, or pass nan_policy='mask' to "
                "get NaN wherever the interpolated input is undefined."
            )
        if not np.all(np.isfinite(values[~np.isnan(values)])):
            raise ValueError("The low-res input contains infinite values.")
        dst = self._target_grid(src, target_grid)
        static = self._resolve_static(static_fields, dst, layout)
        self._check_range(values)
        return PreparedFields(values=values, src=src, dst=dst, static=static, layout=layout)

    def _from_array(self, low_res):
        values = low_res.detach().cpu().numpy() if isinstance(low_res, torch.Tensor) else np.asarray(low_res)
        if values.ndim == 3:
            values = values[None]
        if values.ndim != 4 or values.shape[1] != len(self.variables):
            raise ValueError(
                f"Array input must be (batch, {len(self.variables)} variables, lat, lon) for variables "
                f"{self.variables}, got shape {values.shape}."
            )
        h, w = values.shape[-2:]
        # index coordinates: a coarse cell i covers fine cells i*s .. i*s + s - 1
        src = Grid(np.arange(h, dtype=float), np.arange(w, dtype=float))
        layout = FieldLayout(kind="array", tensor=isinstance(low_res, torch.Tensor),
                             sample_keys=tuple(position_keys(values.shape[0])))
        return values, src, layout

    def _from_xarray(self, low_res, member_dim, variable_map):
        import xarray as xr

        from dpdm_diffusers.units import convert_units

        variables = self.variables
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
            raise TypeError(
                f"low_res must be an xarray Dataset/DataArray, a torch.Tensor or a numpy array, got {type(low_res)}.")
        # a grid-mapping variable is metadata of the grid, not a field (xarray reads it as a data variable)
        ds = ds.set_coords([k for k, v in ds.data_vars.items() if "grid_mapping_name" in v.attrs])
        ds, rename_back = apply_variable_map(ds, variable_map, variables, exact=True)
        axes = native_axes(ds)
        if axes is not None:  # rotated pole or a projection: tiles on its own axes, never wrapped
            lat_name, lon_name = axes.y, axes.x
            check_geographic_coords(ds, axes)
        else:
            lat_name, lon_name = lat_lon_names(ds)
            check_lat_lon(ds, lat_name, lon_name)
            ds = contiguous_longitude(ds, lat_name, lon_name)
        mapping = axes.mapping if axes is not None else None
        src_in = Grid(ds[lat_name].values, ds[lon_name].values, mapping)  # validates monotonic/unique/regular
        lat_desc, lon_desc = src_in.lat[0] > src_in.lat[-1], src_in.lon[0] > src_in.lon[-1]
        ds = ds.sortby([lat_name, lon_name])
        src = Grid(ds[lat_name].values, ds[lon_name].values, mapping)
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
        if member_dim in ds.coords and member_dim not in ds.dims:
            # a scalar label (e.g. `.isel(member=0)` of an ensemble) would clash with the output's member dimension:
            # kept under another name
            ds = ds.rename({member_dim: f"input_{member_dim}"})
        if member_dim in batch_dims:
            raise ValueError(
                f"The input already has a {member_dim!r} dimension; rename it (e.g. "
                f"ds.rename({member_dim}='realization')) or pass member_dim='ensemble'."
            )
        arrays = []
        for v, u in zip(variables, self.units):
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
        layout = FieldLayout(
            kind=kind, sample_keys=tuple(sample_keys(ds, batch_dims)), template=ds, lat_name=lat_name,
            lon_name=lon_name, batch_dims=tuple(batch_dims), batch_shape=tuple(batch_shape),
            lat_descending=bool(lat_desc), lon_descending=bool(lon_desc), lon_base=lon_base,
            rename_back=rename_back,
        )
        return values.reshape(-1, *values.shape[-3:]), src, layout

    def _target_grid(self, src: Grid, target_grid) -> Grid:
        if target_grid is None:
            return src.refine(self.scale_factor)
        dst = target_grid if isinstance(target_grid, Grid) else Grid.from_xarray(target_grid)
        dst = Grid(np.sort(dst.lat), np.sort(dst.lon), dst.mapping)
        if dst.mapping != src.mapping:
            raise ValueError(f"The target is a {dst.describe()}, the low-res input a {src.describe()}: both must be "
                             "on the same kind of grid (regrid the input with dpdm regrid first).")
        ratio = src.scale_factor_to(dst)
        if abs(ratio - self.scale_factor) > 0.05 * self.scale_factor:
            raise ValueError(
                f"Wrong scale factor: the target grid is {ratio:.3g}x finer than the low-res grid, but this "
                f"model was trained for {self.scale_factor}x (low-res spacing {src.dlat:.4g}, target {dst.dlat:.4g})."
            )
        return dst

    def _resolve_static(self, static_fields, dst: Grid, layout: FieldLayout) -> np.ndarray | None:
        names = self.static_channels
        if not names:
            return None
        if static_fields is None:
            if layout.is_array:
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
            arr = _as_numpy(static_fields)
            if arr.shape != (len(names), *dst.shape):
                raise ValueError(f"Static array must have shape {(len(names), *dst.shape)} for {names}, got {arr.shape}.")
            bad = [n for n, a in zip(names, arr) if not np.isfinite(a).all()]
            if bad:
                raise ValueError(f"Static field(s) {bad} contain NaN or inf; fill them (e.g. 0 m over the ocean).")
            return arr.astype(np.float32)
        missing = [n for n in names if n not in static_fields]
        if missing:
            raise ValueError(f"Static fields {missing} are missing; the model needs {names}.")
        out = []
        for n in names:
            f = static_fields[n]
            if isinstance(f, (torch.Tensor, np.ndarray)):
                arr = _as_numpy(f)
                if arr.shape != dst.shape:
                    raise ValueError(f"Static field {n!r} has shape {arr.shape}, the target grid is {dst.shape}.")
            else:
                arr = _on_target_grid(f, n, dst)
            if not np.isfinite(arr).all():
                raise ValueError(f"Static field {n!r} contains NaN or inf; fill it (e.g. 0 m over the ocean).")
            out.append(arr.astype(np.float32))
        return np.stack(out)

    def _check_range(self, values: np.ndarray, max_std: float = 10.0) -> None:
        """Refuse inputs more than ``max_std`` training standard deviations from the training mean (after the
        variable's transform): wrong units (degC labelled K) or corrupt values, never a silent wrong answer."""
        for i, (v, u, t) in enumerate(zip(self.variables, self.units, self.transforms)):
            x = values[:, i]
            finite = x[np.isfinite(x)]
            if not finite.size:
                continue
            z = (forward_transform(torch.from_numpy(finite), t).numpy() - self.norm_mean[i]) / self.norm_std[i]
            if np.abs(z).max() > max_std:
                lo, hi = np.nanmin(x), np.nanmax(x)
                space = u if t == "identity" else f"({t})"
                raise ValueError(
                    f"Variable {v!r} spans {lo:.4g} .. {hi:.4g} {u}, more than {max_std:g} standard deviations from "
                    f"what the model was trained on (mean {self.norm_mean[i]:.4g}, std {self.norm_std[i]:.4g} "
                    f"{space}). Wrong units or corrupt values?")

    # ------------------------------------------------------------------------------------------
    # out
    # ------------------------------------------------------------------------------------------
    def apply_dry_threshold(self, members: torch.Tensor) -> torch.Tensor:
        """Members ``(..., V, H, W)`` with every value below its variable's ``dry_threshold`` set to 0: a diffusion
        model's drizzle (tiny positive amounts everywhere) would otherwise make every point wet."""
        if not any(self.dry_threshold):
            return members
        thr = torch.tensor(self.dry_threshold, dtype=members.dtype).view(-1, 1, 1)
        # only variables with a threshold: a threshold of 0 must leave a wind's negative values alone
        return torch.where((members < thr) & (thr > 0), torch.zeros_like(members), members)

    def conserve(self, members: torch.Tensor, prepared: PreparedFields) -> torch.Tensor:
        """Members ``(M, B, V, H, W)`` whose block means equal the low-res input (``conserve`` in ``__call__``):
        additive for ``identity`` variables, multiplicative for non-negative (``log1p``, ``sqrt``) ones."""
        from dpdm_diffusers.conservation import conserve

        s = self.scale_factor
        refined = prepared.src.refine(s)
        dst = prepared.dst
        if refined.shape != dst.shape or not (np.allclose(refined.lat, dst.lat) and np.allclose(refined.lon, dst.lon)):
            raise ValueError("conserve=True needs the default target grid (the low-res grid refined by scale_factor): "
                             "only then is each coarse cell the block mean of its fine cells.")
        low = torch.from_numpy(prepared.values)
        out = members.clone()
        for i, t in enumerate(self.transforms):
            method = "additive" if t == "identity" else "multiplicative"
            out[:, :, i] = conserve(members[:, :, i : i + 1], low[:, i : i + 1], s, method=method)[:, :, 0]
        return out

    def postprocess(self, members: np.ndarray, prepared: PreparedFields, member_dim: str = "member",
                    info: Mapping | None = None):
        """Members ``(M, B, V, H, W)`` in physical units -> ``(members, mean, std)`` in the caller's layout, each a
        Dataset (or DataArray for DataArray input) with CF attributes; ``info`` is recorded as ``dpdm_*`` attributes.
        """
        import xarray as xr

        layout, dst = prepared.layout, prepared.dst
        ds_in, lat_name, lon_name = layout.template, layout.lat_name, layout.lon_name
        m = members.shape[0]
        members = members.reshape(m, *layout.batch_shape, *members.shape[-3:])  # (M, *batch, V, H, W)
        # a native grid also gets 2-D lat/lon and its grid mapping, as CF tools read the input
        coords = output_coords(dst, lat_name, lon_name, ds_in[lat_name].attrs, ds_in[lon_name].attrs)
        coords[member_dim] = xr.Variable(member_dim, np.arange(m), {"long_name": "ensemble member"})
        for name, c in ds_in.coords.items():  # time, scalar and other non-spatial coords carry through
            if name not in coords and not ({lat_name, lon_name} & set(c.dims)):
                coords[name] = c
        attrs = output_attrs(ds_in.attrs, scale_factor=self.scale_factor, info=info)

        def dataset(arr, dims_lead, cell_method, long_suffix):
            data_vars = {}
            for i, (v, u) in enumerate(zip(self.variables, self.units)):
                va = {k: a for k, a in ds_in[v].attrs.items() if k not in ("coordinates", "grid_mapping")}
                va["units"] = u
                if dst.mapping is not None:
                    va["grid_mapping"] = dst.mapping.name
                if cell_method:  # appended: the input's own (e.g. "time: mean") still holds
                    va["cell_methods"] = f"{va.get('cell_methods', '')} {member_dim}: {cell_method}".strip()
                if long_suffix:
                    va["long_name"] = f"{va.get('long_name', v)} {long_suffix}".strip()
                data_vars[v] = xr.Variable((*dims_lead, *layout.batch_dims, lat_name, lon_name), arr[..., i, :, :], va)
            keep = {k: c for k, c in coords.items() if k != member_dim or dims_lead}
            return self._restore(clean_cf(xr.Dataset(data_vars, coords=keep, attrs=attrs)), layout)

        mean = members.mean(axis=0)
        std = members.std(axis=0, ddof=1) if m > 1 else np.zeros_like(mean)
        return (
            dataset(members, (member_dim,), None, None),
            dataset(mean, (), "mean", "ensemble mean"),
            dataset(std, (), "standard_deviation", "ensemble spread"),
        )

    @staticmethod
    def _restore(out, layout: FieldLayout):
        """Give the caller back their longitude convention, coordinate order, variable names and object type."""
        import xarray as xr

        lon_name = layout.lon_name
        if layout.lon_base is not None:
            base = layout.lon_base
            theirs = base + np.mod(out[lon_name].values - base, 360.0)
            out = out.assign_coords({lon_name: xr.Variable(lon_name, theirs, out[lon_name].attrs)}).sortby(lon_name)
        if layout.lat_descending:
            out = out.isel({layout.lat_name: slice(None, None, -1)})
        if layout.lon_descending:
            out = out.isel({lon_name: slice(None, None, -1)})
        out = out.rename(dict(layout.rename_back)) if layout.rename_back else out
        return out[list(out.data_vars)[0]] if layout.kind == "dataarray" else out


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _on_target_grid(f, name: str, dst: Grid) -> np.ndarray:
    """An xarray static field as an array on ``dst``: it must be that grid (in either longitude convention/order)."""
    if dst.mapping is not None:
        src = Grid.from_xarray(f)
        ya, xa = grid_dims(f)
        f = f.sortby([ya, xa]).squeeze(drop=True)
        if not src.same_cells(dst):
            raise ValueError(f"Static field {name!r} is on a {src.describe()}, the target is a {dst.describe()}: "
                             "give it on the target grid (get_static_fields(grid, sources=...) regrids a file).")
        return f.transpose(ya, xa).values
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
            f"Static field {name!r} is on a {lat.size}x{lon.size} grid (lat {lat.min():.3f}..{lat.max():.3f}, "
            f"lon {lon.min():.3f}..{lon.max():.3f}) but the target grid is {dst.shape[0]}x{dst.shape[1]} "
            f"(lat {dst.lat.min():.3f}..{dst.lat.max():.3f}, lon {dst.lon.min():.3f}..{dst.lon.max():.3f})."
        )
    return f.transpose(la, lo).values
