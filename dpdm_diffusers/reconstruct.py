"""Long reconstructions: stream a record through the pipeline in chunks of time steps, resumably, over processes.

One job: turn ``(pipeline, low-res record, output path)`` into a complete output file without ever holding
more than one chunk in memory, so a 180-year monthly record runs on a laptop as well as on many GPUs.

* **Streaming**: the record is cut into chunks of ``chunk_size`` time steps; each chunk is downscaled and written
  into its region of a zarr store as soon as it is done. Memory does not depend on the record's length.
* **Resume**: the work happens in ``.<name>.dpdm-partial.zarr`` beside the output. A chunk counts as done only when
  its marker exists and its data reads back with the checksum the marker holds (:mod:`dpdm_diffusers.run_store`);
  damaged chunks are recomputed. A rerun of the same command on the same input skips done chunks; a rerun on other
  input values, coordinates or static fields, other weights, or other settings (sampler, seed, members, dtype,
  conservation, chunking...) is refused with what differs (``overwrite=True`` discards that run instead).
* **Checked before any store exists**: every time step goes through the pipeline's input checks, so a refused
  input leaves nothing behind; one run per output at a time (a lock file).
* **Chunk invariance**: the pipeline keys each member's noise by the time stamp (:mod:`dpdm_diffusers.seeding`),
  so a time step's members do not depend on which chunk, process or resumed run produced them.
* **Scale-out**: under ``accelerate launch`` / ``torchrun``, pending chunks are split between processes with
  Accelerate's ``PartialState.split_between_processes``; each process writes its own regions.
* **Atomic result**: the output appears under its name only when every chunk is done (zarr: the store is moved
  into place; netCDF: streamed from the store to a temporary file, then renamed). An existing output is replaced
  only with ``overwrite=True`` and only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from . import __version__
from .cf_attrs import clean_cf, output_attrs
from .grids import grid_dims
from .io import check_output, is_own_output, netcdf_encoding, output_format, replace_atomically, zarr_encoding
from .naming import apply_variable_map
from .native_grids import output_coords
from .run_store import (
    InputFingerprint,
    OutputLock,
    array_fingerprint,
    coords_fingerprint,
    differences,
    discard,
    explain_store_error,
    is_write_error,
    mark_done,
    marked,
    markers_path,
    model_fingerprint,
    read_region,
    refusal,
    region_checksum,
    whole_chunks,
)
from .seeding import infer_time_unit

logger = logging.getLogger(__name__)

__all__ = ["ReconstructionResult", "reconstruct", "partial_path", "run_settings"]

RUN_ATTR = "dpdm_run"
SPATIAL_CHUNK = 96  # zarr/netCDF chunks of (1 member, chunk_size steps, <=96, <=96): one time step or one point's
#                     series is read without touching the whole record or the whole field


@dataclass
class ReconstructionResult:
    path: Path
    chunks_total: int
    chunks_computed: int  # by this process, in this call
    seconds: float
    time_steps_per_minute: float
    members_per_second: float


def process_state():
    """Accelerate's view of the processes (``torchrun``/``accelerate launch``); on a machine without a GPU
    Accelerate needs ``cpu=True`` to join the gloo process group instead of running each process alone."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def partial_path(output: Path) -> Path:
    """Where the unfinished store of ``output`` lives (a stable name, so a rerun finds it)."""
    output = Path(output)
    return output.with_name(f".{output.name}.dpdm-partial.zarr")


def run_settings(pipe, low_res: xr.Dataset, *, num_members, num_inference_steps, seed, chunk_size, members, stats,
                 variable_map, model_id, conserve=False, extra: Mapping | None = None) -> dict:
    """Everything that determines the output's values and layout (compared on resume, except the model's name:
    :data:`~dpdm_diffusers.run_store.NOT_COMPARED`). ``extra`` adds the input fingerprints and options such as the
    noise correlation (only when set, so they do not differ from a run that never had them)."""
    times = low_res["time"].values if "time" in low_res.dims else np.array([0])
    return {
        "model": str(model_id), "model_fingerprint": model_fingerprint(pipe),
        "dtype": str(getattr(pipe, "autocast_dtype", None) or "float32").replace("torch.", ""),
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "num_inference_steps": int(num_inference_steps), "num_members": int(num_members), "seed": int(seed),
        "chunk_size": int(chunk_size), "members": bool(members), "stats": bool(stats),
        "variable_map": dict(variable_map or {}), "variables": sorted(map(str, low_res.data_vars)),
        "time_steps": int(len(times)), "time_first": str(times[0]), "time_last": str(times[-1]),
        "grid": [int(low_res.sizes[d]) for d in grid_dims(low_res)],
        **({"conserve": True} if conserve else {}),
        **{k: v for k, v in (extra or {}).items() if v},
    }


def model_name(model_id) -> str:
    """How an output records its model: the Hub id, or the folder's name, never a machine's absolute path."""
    text = str(model_id or "")
    return os.path.basename(text.rstrip("/\\")) if os.path.isabs(text) or os.path.isdir(text) else text


def _chunks(n: int, size: int) -> list[tuple[int, int, int]]:
    return [(i, a, min(a + size, n)) for i, a in enumerate(range(0, n, size))]


def _template(pipe, low_res: xr.Dataset, out_names: dict, grid, num_members: int, chunk_size: int, members: bool,
              stats: bool, attrs: dict, member_dim: str) -> xr.Dataset:
    """The store's layout: lazy zeros with the final coordinates, attributes and chunking (nothing computed)."""
    import dask.array as da

    ntime = low_res.sizes["time"]
    ny, nx = grid.shape
    cy, cx = min(ny, SPATIAL_CHUNK), min(nx, SPATIAL_CHUNK)
    ya, xa = grid_dims(low_res)
    coords = {"time": low_res["time"], **output_coords(grid, ya, xa, low_res[ya].attrs, low_res[xa].attrs)}
    if members:
        coords[member_dim] = xr.Variable(member_dim, np.arange(num_members), {"long_name": "ensemble member"})
    for name, c in low_res.coords.items():  # scalar and time-only coordinates carry through (height, forecast_period)
        if name not in coords and set(c.dims) <= {"time"}:
            coords[name] = c.load()
    data_vars = {}
    for user, model_var in out_names.items():
        units = pipe.config.units[list(pipe.config.variables).index(model_var)]
        base = dict(low_res[user].attrs, units=units)  # the input's cell_methods (e.g. "time: mean") still hold
        base.pop("coordinates", None)
        if grid.mapping is not None:
            base["grid_mapping"] = grid.mapping.name
        if members:
            data_vars[user] = ((member_dim, "time", ya, xa),
                               da.zeros((num_members, ntime, ny, nx), chunks=(1, chunk_size, cy, cx), dtype="float32"), base)
        if stats:
            for suffix, method, long in (("mean", "mean", "ensemble mean"), ("std", "standard_deviation", "ensemble spread")):
                a = dict(base, cell_methods=f"{base.get('cell_methods', '')} {member_dim}: {method}".strip(),
                         long_name=f"{base.get('long_name', user)} {long}")
                data_vars[f"{user}_{suffix}"] = (("time", ya, xa),
                                                 da.zeros((ntime, ny, nx), chunks=(chunk_size, cy, cx), dtype="float32"), a)
    return clean_cf(xr.Dataset(data_vars, coords=coords, attrs=attrs))


def reconstruct(
    pipe,
    low_res: xr.Dataset,
    output: str | os.PathLike,
    *,
    num_members: int = 10,
    num_inference_steps: int = 10,
    seed: int = 0,
    chunk_size: int = 12,
    static_fields=None,
    variable_map: Mapping[str, str] | None = None,
    tiles_per_call: int | None = None,
    members: bool = True,
    stats: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    model_id: str | None = None,
    member_dim: str = "member",
    conserve: bool = False,
    noise_time_correlation: float | None = None,
    output_layout: Mapping | None = None,
) -> ReconstructionResult:
    """Downscale ``low_res`` (lazy is fine: one chunk is loaded at a time) into ``output`` (``.zarr`` or ``.nc``).

    ``members`` writes every member (``<var>``); ``stats`` writes ``<var>_mean`` and ``<var>_std``. Safe to kill
    at any moment and to rerun; see the module docstring. ``noise_time_correlation``: the pipeline's option
    (default: the model's), its time unit read once from the whole record so every chunk uses the same.
    ``output_layout``: the input file's dim names and coordinate order (:func:`dpdm_diffusers.data.input_layout`),
    given back in the output. Returns timings of this process's share.
    """
    from tqdm.auto import tqdm

    from .grids import Grid

    state = process_state()
    output = Path(output)
    fmt = output_format(output)  # .nc / .zarr only, checked before any work
    if num_members < 1 or num_inference_steps < 1 or chunk_size < 1:
        raise ValueError(f"num_members, num_inference_steps and chunk_size must be >= 1, got {num_members}, "
                         f"{num_inference_steps}, {chunk_size}.")
    if not (members or stats):
        raise ValueError("Nothing to write: ask for members, stats (mean and spread) or both.")
    if not isinstance(low_res, xr.Dataset):
        raise TypeError(f"low_res must be an xarray Dataset, got {type(low_res)}.")
    if "time" not in low_res.dims:
        low_res = low_res.expand_dims(time=[0])  # a single field is a record of one step, squeezed at the end
        squeeze_time = True
    else:
        squeeze_time = False
    if low_res.sizes["time"] == 0:
        raise ValueError("The input has an empty time dimension: nothing to downscale.")
    check_output(output, overwrite)  # exists / not ours / not writable: refused before any computation
    variable_map = dict(variable_map or {})
    renamed, back = apply_variable_map(low_res, variable_map, pipe.config.variables)
    low_res = renamed.rename(back)  # the model's variables in the caller's names: the pipeline renames them
    out_names = {back.get(v, v): v for v in pipe.config.variables}  # user name -> model name
    # every argument and the input's first step are checked by the pipeline itself before a store exists
    if tiles_per_call is not None:
        pipe.check_inputs(num_members, num_inference_steps, tiles_per_call, None, ())
    first = pipe.processor.preprocess(low_res.isel(time=slice(0, 1)).load(), static_fields, None, member_dim,
                                      "raise", variable_map)
    grid = Grid.from_xarray(low_res).refine(pipe.config.scale_factor)
    time_unit = None
    if noise_time_correlation is None:
        noise_time_correlation = float(pipe.config.get("noise_time_correlation", 0.0))
    if squeeze_time:
        noise_time_correlation = 0.0  # one field has no neighbour in time to be correlated with
    if noise_time_correlation:
        pipe.check_inputs(num_members, num_inference_steps, 1, None, (), noise_time_correlation)
        time_unit = infer_time_unit(low_res["time"].values[:2])
    model_id = model_name(model_id or pipe.config.get("hub_id") or getattr(pipe, "name_or_path", "") or "")
    store = partial_path(output)
    chunks = _chunks(low_res.sizes["time"], chunk_size)
    static = first.static  # validated on the target grid once (derived from packaged data only once)
    if state.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)  # the lock file lives beside the output

    with OutputLock(output) if state.is_main_process else contextlib.nullcontext():
        # 0. Every time step through the pipeline's own input checks, and the input's fingerprint, before a store
        #    exists: a refused input leaves nothing behind, and a resume on other data is refused
        if state.is_main_process:
            fingerprint = _scan_input(pipe, low_res, chunks, static, member_dim, variable_map, progress)
            settings = run_settings(
                pipe, low_res, num_members=num_members, num_inference_steps=num_inference_steps, seed=seed,
                chunk_size=chunk_size, members=members, stats=stats, variable_map=variable_map, model_id=model_id,
                conserve=conserve,
                extra={"input_values": fingerprint, "input_coords": coords_fingerprint(low_res),
                       "static_fields": array_fingerprint(static) if static is not None else None,
                       "noise_time_correlation": float(noise_time_correlation), "noise_time_unit": time_unit,
                       "output_layout": output_layout if _renames(output_layout) else None})
            settings = json.loads(json.dumps(settings, default=str))  # compared with the stored JSON: same types
            try:
                _open_store(pipe, low_res, store, settings, overwrite, out_names=out_names, grid=grid,
                            num_members=num_members, chunk_size=chunk_size, members=members, stats=stats,
                            member_dim=member_dim, model_id=model_id, seed=seed,
                            num_inference_steps=num_inference_steps)
            except OSError as err:
                if not is_write_error(err):
                    raise
                raise explain_store_error(err, store, 0, 0, len(chunks)) from err
            # 1. Chunks marked done whose data does not read back whole are recomputed
            whole = whole_chunks(store, _stored_names(out_names, members, stats), chunks)
            if whole:
                logger.info("resuming %s: %d of %d chunks already done", store, len(whole), len(chunks))
        state.wait_for_everyone()

        # 2. This process's share of the pending chunks
        done = marked(store, len(chunks))
        pending = [c for c in chunks if c[0] not in done]
        state.wait_for_everyone()  # every process listed the same pending chunks before any is marked
        with state.split_between_processes(pending) as mine:
            mine = list(mine)
        t0, steps_done = time.perf_counter(), 0
        bar = tqdm(total=low_res.sizes["time"], initial=sum(b - a for i, a, b in chunks if i in done), unit="step",
                   desc="downscale", disable=not (progress and state.is_main_process), dynamic_ncols=True)
        pipe.set_progress_bar_config(disable=True)
        for n, (i, a, b) in enumerate(mine):
            low = low_res.isel(time=slice(a, b)).load()
            out = pipe(low, static_fields=static, num_members=num_members, num_inference_steps=num_inference_steps,
                       generator=torch.Generator().manual_seed(seed), tiles_per_call=tiles_per_call,
                       variable_map=variable_map, member_dim=member_dim, conserve=conserve,
                       noise_time_correlation=noise_time_correlation, noise_time_unit=time_unit)
            ds = _chunk_dataset(out, out_names, members, stats, member_dim)
            for v in ds.data_vars:
                if not np.isfinite(ds[v].values).all():  # the input was checked finite: this is a model failure
                    raise FloatingPointError(
                        f"Chunk {i} (time steps {a}:{b}) gave non-finite values for {v}; nothing was written.")
            try:
                ds.to_zarr(store, region={"time": slice(a, b)}, mode="r+", zarr_format=2, consolidated=False)
                checksum = region_checksum(ds)
                # a chunk is done when it reads back as written (the marker, written after, holds the checksum)
                if region_checksum(read_region(store, ds.data_vars, a, b)) != checksum:
                    raise OSError(errno.EIO, f"chunk {i} of {store} did not read back as written (a failing disk?)",
                                  str(store))
                mark_done(store, i, a, b, checksum)
            except OSError as err:
                if not is_write_error(err):
                    raise
                left = sum(bb - aa for _, aa, bb in mine[n:]) * ds.nbytes // max(b - a, 1)
                raise explain_store_error(err, store, left, len(done) + n, len(chunks)) from err
            steps_done += b - a
            elapsed = time.perf_counter() - t0
            bar.update(b - a)
            bar.set_postfix(members_per_s=f"{steps_done * num_members / max(elapsed, 1e-9):.2f}")
        bar.close()
        elapsed = time.perf_counter() - t0
        state.wait_for_everyone()

        # 3. Finish: every chunk whole (read back again) -> move the store into place (zarr) or stream it to netCDF
        if state.is_main_process:
            whole = whole_chunks(store, _stored_names(out_names, members, stats), chunks)
            left = len(chunks) - len(whole)
            if left:
                raise RuntimeError(f"{left} chunk(s) of {store} are not done or did not read back whole; rerun the "
                                   "same command to compute them.")
            try:
                _finish(store, output, fmt, overwrite, squeeze_time, output_layout)
            except OSError as err:
                if not is_write_error(err):
                    raise
                raise explain_store_error(err, store, _store_bytes(store), len(chunks), len(chunks)) from err
        state.wait_for_everyone()
    return ReconstructionResult(
        path=output, chunks_total=len(chunks), chunks_computed=len(mine), seconds=elapsed,
        time_steps_per_minute=60 * steps_done / max(elapsed, 1e-9),
        members_per_second=steps_done * num_members / max(elapsed, 1e-9),
    )


def _stored_names(out_names: Mapping, members: bool, stats: bool) -> list[str]:
    """The store's data variables (what a chunk's checksum covers)."""
    names = []
    for user in out_names:
        names += ([user] if members else []) + ([f"{user}_mean", f"{user}_std"] if stats else [])
    return names


def _scan_input(pipe, low_res: xr.Dataset, chunks, static, member_dim: str, variable_map: Mapping,
                progress: bool) -> str:
    """Run every chunk of the input through the pipeline's input checks (units, NaN, range, dims) and return the
    fingerprint of the values the model will see; one read of the input, a chunk at a time."""
    from tqdm.auto import tqdm

    times = low_res.indexes["time"]
    if not times.is_unique:
        dup = times[times.duplicated()][:3]
        raise ValueError(f"The input's time stamps repeat ({', '.join(map(str, dup))}): each time step's noise is keyed "
                         "by its stamp, so repeated stamps would share members. Drop or relabel the duplicates.")
    fingerprint = InputFingerprint()
    for _, a, b in tqdm(chunks, desc="check input", unit="chunk", disable=not progress or len(chunks) < 8,
                        dynamic_ncols=True, leave=False):
        prepared = pipe.processor.preprocess(low_res.isel(time=slice(a, b)).load(), static, None, member_dim, "raise",
                                             variable_map)
        fingerprint.update(prepared.values)
    return fingerprint.hexdigest()


def _open_store(pipe, low_res: xr.Dataset, store: Path, settings: dict, overwrite: bool, *, out_names, grid,
                num_members, chunk_size, members, stats, member_dim, model_id, seed, num_inference_steps) -> None:
    """Check that an unfinished store belongs to this run (``overwrite`` discards one that does not), or create the
    store: its layout written under a temporary name, then moved into place whole."""
    if store.exists():
        try:
            old = json.loads(xr.open_zarr(store, consolidated=False).attrs[RUN_ATTR])
        except Exception as err:  # not ours, or unreadable: never delete what we cannot identify
            raise ValueError(f"{store} exists but is not a readable dpdm run ({err}); move it away.") from err
        diff = differences(old, settings)
        if not diff:
            return
        if not overwrite:
            raise ValueError(refusal(store, diff))
        logger.warning("discarding the unfinished run in %s (it differs in %s)", store, diff)
        discard(store)
    info = {"model": model_id, "scheduler": settings["scheduler"], "num_inference_steps": num_inference_steps,
            "num_members": num_members, "seed": seed, "version": __version__,
            "config": json.dumps({k: v for k, v in dict(pipe.config).items() if not k.startswith("_")}, default=str)}
    attrs = output_attrs({k: v for k, v in low_res.attrs.items() if k != RUN_ATTR},
                         scale_factor=pipe.config.scale_factor, info=info)
    attrs[RUN_ATTR] = json.dumps(settings, default=str)
    tmpl = _template(pipe, low_res, out_names, grid, num_members, chunk_size, members, stats, attrs, member_dim)
    tmp = store.with_name(store.name + f".init-{os.getpid()}")
    try:
        tmpl.to_zarr(tmp, mode="w", compute=False, zarr_format=2, consolidated=True, encoding=zarr_encoding(tmpl))
        shutil.rmtree(markers_path(store), ignore_errors=True)  # stale markers of a store deleted by hand
        markers_path(store).mkdir()
        os.replace(tmp, store)  # the store appears complete with its layout, or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # never an .init-* folder left behind


def _chunk_dataset(out, out_names: Mapping, members: bool, stats: bool, member_dim: str) -> xr.Dataset:
    """A pipeline output as the store's region: float32 data only (coordinates and attributes are in the store)."""
    region = {}
    ya, xa = grid_dims(out.mean)
    for user in out_names:
        if members:
            region[user] = out.members[user].transpose(member_dim, "time", ya, xa).astype("float32")
        if stats:
            region[f"{user}_mean"] = out.mean[user].transpose("time", ya, xa).astype("float32")
            region[f"{user}_std"] = out.std[user].transpose("time", ya, xa).astype("float32")
    ds = xr.Dataset(region)
    ds = ds.drop_vars(list(ds.coords))
    for v in ds.data_vars:
        ds[v].attrs = {}
    return ds


def _store_bytes(store: Path) -> int:
    return sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) if store.exists() else 0


def _finish(store: Path, output: Path, fmt: str, overwrite: bool, squeeze_time: bool,
            layout: Mapping | None = None) -> None:
    import zarr

    from .data import restore_layout

    zarr.consolidate_metadata(str(store))
    if output.exists() and (not overwrite or not is_own_output(output)):  # appeared meanwhile: never clobber it
        raise FileExistsError(f"{output} appeared while this run was computing; the result stays in {store}.")
    if squeeze_time:  # one field: small, written with the atomic single-shot writer
        from .io import write_dataset

        with xr.open_zarr(store) as ds:
            write_dataset(restore_layout(ds.isel(time=0, drop=True).load(), layout), output, overwrite=True)
        shutil.rmtree(store)
        shutil.rmtree(markers_path(store))
        return
    if fmt == "netcdf":
        ds = restore_layout(xr.open_zarr(store), layout)
        enc = netcdf_encoding(ds, chunked=True)  # the store's chunks: streamed chunk by chunk
        tmp = output.with_name(f".{output.name}.partial-{os.getpid()}")
        try:
            ds.to_netcdf(tmp, encoding=enc)  # dask streams chunk by chunk: bounded memory
        except BaseException as err:
            tmp.unlink(missing_ok=True)  # e.g. disk full: no half-written file left behind; the store stays
            from .io import explain_write_error

            better = explain_write_error(err, output)
            if better is not err:
                raise better from err
            raise
        finally:
            ds.close()
        os.replace(tmp, output)  # a file is replaced atomically; the old one stays intact until now
        shutil.rmtree(store)
        shutil.rmtree(markers_path(store))
        return
    if not _renames(layout):
        replace_atomically(store, output)  # zarr: the old output stays intact until the new one is in place
        shutil.rmtree(markers_path(store))
        return
    # the input's names or order differ from the store's: one copy, streamed chunk by chunk, then swapped in
    tmp = store.with_name(store.name + f".layout-{os.getpid()}")
    with xr.open_zarr(store) as ds:
        ds = restore_layout(ds, layout)
        for v in ds.variables.values():
            v.encoding.pop("chunks", None)
            v.encoding.pop("preferred_chunks", None)
        ds.to_zarr(tmp, mode="w", zarr_format=2, consolidated=True, encoding=zarr_encoding(ds))
    replace_atomically(tmp, output)
    shutil.rmtree(store)
    shutil.rmtree(markers_path(store))


def _renames(layout: Mapping | None) -> bool:
    """Whether ``layout`` differs from the store's own (lat, lon, time ascending)."""
    if not layout:
        return False
    return any(layout.get(d, d) != d for d in ("lat", "lon", "y", "x", "time")) or any(
        layout.get(f"{d}_descending") for d in ("lat", "lon", "y", "x"))
