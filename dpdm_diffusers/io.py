"""Writing results: netCDF or zarr, atomically, never clobbering a file by accident.

Only this module and the CLI write files. A result is written to a temporary name beside the target
and renamed into place when complete, so an interrupted run never leaves a truncated file under the
final name and an existing file is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import xarray as xr

FORMATS = {".nc": "netcdf", ".nc4": "netcdf", ".zarr": "zarr"}


def output_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"Cannot tell the format of {str(path)!r}: use a .nc (netCDF) or .zarr path.")
    return FORMATS[suffix]


def _encoding(ds: xr.Dataset) -> dict:
    # float32 with compression: ensembles are large; zlib is in every netCDF4 build
    return {v: {"zlib": True, "complevel": 4, "dtype": "float32"} for v in ds.data_vars if np.issubdtype(ds[v].dtype, np.floating)}


def write_dataset(ds: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``ds`` to ``path`` (``.nc`` or ``.zarr``) atomically."""
    path = Path(path)
    fmt = output_format(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if isinstance(ds, xr.DataArray):
        ds = ds.to_dataset()
    if fmt == "netcdf":
        ds.to_netcdf(tmp, encoding=_encoding(ds))
    else:
        # Zarr format 2 with consolidated metadata: what most Pangeo readers (and zarr v2) open
        ds.to_zarr(tmp, mode="w", zarr_format=2, consolidated=True)
    if path.is_dir():  # a zarr store: os.replace cannot replace a non-empty directory
        shutil.rmtree(path)
    os.replace(tmp, path)  # a file is replaced atomically
    return path


def ensemble_dataset(members, mean, std, member_dim: str = "member") -> xr.Dataset:
    """One dataset with the members, ensemble mean (``<var>_mean``) and spread (``<var>_std``)."""
    if isinstance(members, xr.DataArray):
        members, mean, std = members.to_dataset(), mean.to_dataset(), std.to_dataset()
    out = members.copy()
    for v in members.data_vars:
        out[f"{v}_mean"] = mean[v]
        out[f"{v}_std"] = std[v]
    return out
