"""Writing results: netCDF or zarr, atomically, never clobbering a file by accident.

Only this module and the CLI write files. A result is written to a temporary name beside the target
and renamed into place when complete, so an interrupted run never leaves a truncated file under the
final name and an existing file is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import xarray as xr

FORMATS = {".nc": "netcdf", ".nc4": "netcdf", ".zarr": "zarr"}


def output_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"Cannot tell the format of {str(path)!r}: use a .nc (netCDF) or .zarr path.")
    return FORMATS[suffix]


def netcdf_encoding(ds: xr.Dataset, *, chunked: bool = False) -> dict:
    """The netCDF encoding of every writer: floating-point variables as zlib-compressed float32 (ensembles are
    large; zlib is in every netCDF4 build); coordinates without ``_FillValue``, times as float64 and 64-bit integer
    coordinates as int32 (CF-1.8 data types); other variables keep xarray's defaults.

    ``chunked=True`` also keeps each variable's storage chunks (``encoding["chunks"]``, e.g. of a zarr store being
    streamed to netCDF), clipped to its shape, as netCDF chunk sizes."""
    out = {}
    for name in ds.coords:  # CF: no _FillValue on coordinates, no 64-bit integers (not a netCDF classic type)
        c = ds[name]
        enc: dict = {"_FillValue": None}
        if c.dtype.kind in "Mm" or (c.dtype == object and c.size and hasattr(c.values.flat[0], "calendar")):
            enc["dtype"] = "float64"  # times: xarray would pick int64
        elif c.dtype.kind in "iu" and c.dtype.itemsize == 8:
            if c.size == 0 or (np.iinfo(np.int32).min <= int(c.min()) and int(c.max()) <= np.iinfo(np.int32).max):
                enc["dtype"] = "int32"
        out[name] = enc
    for v in ds.data_vars:
        if not np.issubdtype(ds[v].dtype, np.floating):
            continue
        enc = {"zlib": True, "complevel": 4, "dtype": "float32"}
        chunks = ds[v].encoding.get("chunks")
        if chunked and chunks is not None and len(chunks) == ds[v].ndim:
            enc["chunksizes"] = tuple(min(s, c) for s, c in zip(ds[v].shape, chunks))
        out[v] = enc
    return out


def zarr_encoding(ds: xr.Dataset) -> dict:
    """The zarr encoding of every writer: numeric variables compressed with Blosc zstd + bit shuffle (float fields
    come out ~1.1-2x smaller and stay fast to read), in the key the installed zarr expects (``compressors`` from
    zarr 3, ``compressor`` before)."""
    import zarr
    from numcodecs import Blosc

    comp = Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)
    key, value = ("compressors", [comp]) if int(zarr.__version__.split(".")[0]) >= 3 else ("compressor", comp)
    return {v: {key: value} for v in ds.data_vars if np.issubdtype(ds[v].dtype, np.number) or ds[v].dtype == bool}


REPO_ROOT = Path(__file__).resolve().parents[1]


def portable_path(value):
    """Paths as results files and model cards record them: relative to the working directory or the repository when
    inside it, else the bare name; never a machine's absolute path. Lists and dicts are converted item by item;
    anything that is not an absolute path is returned as it is."""
    if isinstance(value, (list, tuple)):
        return [portable_path(v) for v in value]
    if isinstance(value, dict):
        return {k: portable_path(v) for k, v in value.items()}
    if isinstance(value, (str, os.PathLike)) and os.path.isabs(value):
        for base in (Path.cwd(), REPO_ROOT):
            rel = os.path.relpath(value, base)
            if not rel.startswith(".."):
                return rel
        return os.path.basename(os.fspath(value).rstrip("/"))
    return value


def portable_command(command) -> str:
    """A command line (a string or an argv list) with every absolute path argument made :func:`portable_path`, also
    the value of an ``--option=/path`` argument, so a recorded command never names a machine's folders."""
    import shlex

    if isinstance(command, str):
        try:
            args = shlex.split(command)
        except ValueError:  # unbalanced quotes: split on blanks
            args = command.split()
    else:
        args = [os.fspath(a) for a in command]
    out = []
    for a in args:
        if a.startswith("-") and "=" in a:
            key, value = a.split("=", 1)
            out.append(f"{key}={portable_path(value)}")
        else:
            out.append(portable_path(a))
    return shlex.join(out)


def is_own_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an output this tool wrote (so ``overwrite`` may replace it): a netCDF *file*, or a zarr
    store whose attributes name dpdm-diffusers. Anything else (a folder named ``x.nc``, a foreign zarr store, a
    directory of other files) is never deleted."""
    import json

    path = Path(path)
    if not path.exists():
        return True
    if output_format(path) == "netcdf":
        return path.is_file()
    for meta in (".zattrs", "zarr.json"):
        f = path / meta
        if f.is_file():
            try:
                attrs = json.loads(f.read_text())
            except ValueError:
                return False
            attrs = attrs.get("attributes", attrs)
            return any(str(attrs.get(k, "")).startswith("dpdm-diffusers") for k in ("source", "written_by")) or "dpdm_run" in attrs
    return False


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any computation, an output path that cannot be written or must not be replaced."""
    path = Path(path)
    output_format(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it.")
        if not is_own_output(path):
            raise FileExistsError(f"{path} exists and is not an output of dpdm-diffusers; refusing to replace it.")
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"Cannot write {path}: {existing} is not a writable directory.")
    return path


def replace_atomically(tmp: Path, path: Path) -> None:
    """Move the complete ``tmp`` to ``path``; an old output stays intact until the new one is in place."""
    if path.is_dir():  # a zarr store: os.replace cannot replace a non-empty directory, so swap via a unique name
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)  # a file is replaced atomically


def explain_write_error(err: BaseException, path: Path) -> BaseException:
    """A full disk or file-size limit, reported as such (netCDF says only "NetCDF: HDF error")."""
    import errno

    no_space = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    if not no_space and "HDF error" in str(err):
        try:
            no_space = shutil.disk_usage(path.parent).free < 64 * 2**20
        except OSError:
            no_space = False
    if no_space:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        return OSError(errno.ENOSPC, f"No space left to write {path} ({free / 2**20:.0f} MB free on its disk, or a "
                                     f"file-size limit); nothing was left half-written", str(path))
    return err


def write_dataset(ds: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``ds`` to ``path`` (``.nc`` or ``.zarr``) atomically, under a temporary name unique to this writer."""
    path = check_output(path, overwrite)
    fmt = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if isinstance(ds, xr.DataArray):
        ds = ds.to_dataset()
    try:
        if fmt == "netcdf":
            ds.to_netcdf(tmp, encoding=netcdf_encoding(ds))
        else:
            # Zarr format 2 with consolidated metadata: what most Pangeo readers (and zarr v2) open; the stamp lets a
            # later overwrite tell its own store from a folder it must not delete
            from . import __version__

            ds = ds.assign_attrs(written_by=f"dpdm-diffusers {__version__}")
            ds.to_zarr(tmp, mode="w", zarr_format=2, consolidated=True, encoding=zarr_encoding(ds))
        replace_atomically(tmp, path)
    except (OSError, RuntimeError) as err:
        better = explain_write_error(err, path)
        if better is err:
            raise
        raise better from err
    finally:
        if tmp.exists():  # a failed write leaves nothing behind
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
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
