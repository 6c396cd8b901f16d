"""Long reconstructions: stream a record through the pipeline in chunks of time steps, resumably, over processes.

One job: turn ``(pipeline, low-res record, output path)`` into a complete output file without ever holding
more than one chunk in memory, so a 180-year monthly record runs on a laptop as well as on many GPUs.

* **Streaming**: the record is cut into chunks of ``chunk_size`` time steps; each chunk is downscaled and written
  into its region of a zarr store as soon as it is done. Memory does not depend on the record's length.
* **Resume**: the work happens in ``.<name>.dpdm-partial.zarr`` beside the output. A chunk counts as done only when
  its marker file exists, written after its data. A rerun of the same command skips done chunks; a rerun with
  other settings (model, seed, members, steps, scheduler, chunking...) is refused instead of mixing runs.
* **Chunk invariance**: the pipeline keys each member's noise by the time stamp (:mod:`dpdm_diffusers.seeding`),
  so a time step's members do not depend on which chunk, process or resumed run produced them.
* **Scale-out**: under ``accelerate launch`` / ``torchrun``, pending chunks are split between processes with
  Accelerate's ``PartialState.split_between_processes``; each process writes its own regions.
* **Atomic result**: the output appears under its name only when every chunk is done (zarr: the store is moved
  into place; netCDF: streamed from the store to a temporary file, then renamed). An existing output is replaced
  only with ``overwrite=True`` and only after the new one is complete.
"""

from __future__ import annotations

import hashlib
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
from .io import check_output, is_own_output, netcdf_encoding, output_format, replace_atomically, zarr_encoding
from .naming import apply_variable_map
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


def _model_fingerprint(pipe) -> str:
    """A hash of the model's config and weights: a resume with other weights is refused."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps({k: v for k, v in dict(pipe.config).items() if not k.startswith("_")}, sort_keys=True, default=str).encode())
    for name in ("unet", "regression_unet"):
        unet = getattr(pipe, name, None)
        if unet is not None:
            for k, v in sorted(unet.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().float().cpu().numpy().tobytes()[:4096])  # enough to tell checkpoints apart
                h.update(str(float(v.detach().float().sum())).encode())
    return h.hexdigest()


def run_settings(pipe, low_res: xr.Dataset, *, num_members, num_inference_steps, seed, chunk_size, members, stats,
                 variable_map, model_id, conserve=False, extra: Mapping | None = None) -> dict:
    """Everything that determines the output's values and layout (compared on resume)."""
    times = low_res["time"].values if "time" in low_res.dims else np.array([0])
    return {
        "model": str(model_id), "model_fingerprint": _model_fingerprint(pipe),
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "num_inference_steps": int(num_inference_steps), "num_members": int(num_members), "seed": int(seed),
        "chunk_size": int(chunk_size), "members": bool(members), "stats": bool(stats),
        "variable_map": dict(variable_map or {}), "variables": sorted(map(str, low_res.data_vars)),
        "time_steps": int(len(times)), "time_first": str(times[0]), "time_last": str(times[-1]),
        "grid": [int(low_res.sizes["lat"]), int(low_res.sizes["lon"])],
        **({"conserve": True} if conserve else {}),  # only when set: stores written before the option still resume
        **{k: v for k, v in (extra or {}).items() if v},  # likewise: noise correlation, the input's layout
    }


def _chunks(n: int, size: int) -> list[tuple[int, int, int]]:
    return [(i, a, min(a + size, n)) for i, a in enumerate(range(0, n, size))]


def markers_path(store: Path) -> Path:
    """Folder of the per-chunk "done" markers, beside the store (zarr readers warn about foreign files inside)."""
    return store.with_name(store.name[: -len(".zarr")] + ".chunks")


def _marker(store: Path, i: int) -> Path:
    return markers_path(store) / f"chunk-{i:06d}.done"


def _done(store: Path, n_chunks: int) -> set[int]:
    return {i for i in range(n_chunks) if _marker(store, i).exists()}


def _template(pipe, low_res: xr.Dataset, out_names: dict, grid, num_members: int, chunk_size: int, members: bool,
              stats: bool, attrs: dict, member_dim: str) -> xr.Dataset:
    """The store's layout: lazy zeros with the final coordinates, attributes and chunking (nothing computed)."""
    import dask.array as da

    ntime = low_res.sizes["time"]
    ny, nx = grid.shape
    cy, cx = min(ny, SPATIAL_CHUNK), min(nx, SPATIAL_CHUNK)
    coords = {
        "time": low_res["time"], "lat": xr.Variable("lat", grid.lat, low_res["lat"].attrs),
        "lon": xr.Variable("lon", grid.lon, low_res["lon"].attrs),
    }
    if members:
        coords[member_dim] = xr.Variable(member_dim, np.arange(num_members), {"long_name": "ensemble member"})
    for name, c in low_res.coords.items():  # scalar and time-only coordinates carry through (height, forecast_period)
        if name not in coords and set(c.dims) <= {"time"}:
            coords[name] = c.load()
    data_vars = {}
    for user, model_var in out_names.items():
        units = pipe.config.units[list(pipe.config.variables).index(model_var)]
        base = dict(low_res[user].attrs, units=units)  # the input's cell_methods (e.g. "time: mean") still hold
        if members:
            data_vars[user] = ((member_dim, "time", "lat", "lon"),
                               da.zeros((num_members, ntime, ny, nx), chunks=(1, chunk_size, cy, cx), dtype="float32"), base)
        if stats:
            for suffix, method, long in (("mean", "mean", "ensemble mean"), ("std", "standard_deviation", "ensemble spread")):
                a = dict(base, cell_methods=f"{base.get('cell_methods', '')} {member_dim}: {method}".strip(),
                         long_name=f"{base.get('long_name', user)} {long}")
                data_vars[f"{user}_{suffix}"] = (("time", "lat", "lon"),
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
    model_id = model_id or str(getattr(pipe, "name_or_path", "") or "")
    settings = run_settings(pipe, low_res, num_members=num_members, num_inference_steps=num_inference_steps, seed=seed,
                            chunk_size=chunk_size, members=members, stats=stats, variable_map=variable_map, model_id=model_id,
                            conserve=conserve, extra={"noise_time_correlation": float(noise_time_correlation),
                                                      "noise_time_unit": time_unit,
                                                      "output_layout": output_layout if _renames(output_layout) else None})
    settings = json.loads(json.dumps(settings, default=str))  # compared with the stored JSON: same types (lists, str)
    store = partial_path(output)
    chunks = _chunks(low_res.sizes["time"], chunk_size)

    # 1. Create the store, or check that the unfinished one belongs to the same run
    if state.is_main_process:
        output.parent.mkdir(parents=True, exist_ok=True)
        if store.exists():
            try:
                old = json.loads(xr.open_zarr(store, consolidated=False).attrs[RUN_ATTR])
            except Exception as err:  # not ours, or unreadable: never delete what we cannot identify
                raise ValueError(f"{store} exists but is not a readable dpdm run ({err}); move it away.") from err
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                raise ValueError(
                    f"An unfinished run with other settings is in {store} (they differ in {diff}); refusing to mix "
                    "runs. Rerun with the same settings to finish it, or delete that folder to start over.")
            logger.info("resuming %s: %d of %d chunks already done", store, len(_done(store, len(chunks))), len(chunks))
        else:
            info = {"model": model_id, "scheduler": settings["scheduler"], "num_inference_steps": num_inference_steps,
                    "num_members": num_members, "seed": seed, "version": __version__,
                    "config": json.dumps({k: v for k, v in dict(pipe.config).items() if not k.startswith("_")}, default=str)}
            attrs = output_attrs({k: v for k, v in low_res.attrs.items() if k != RUN_ATTR},
                                 scale_factor=pipe.config.scale_factor, info=info)
            attrs[RUN_ATTR] = json.dumps(settings, default=str)
            tmpl = _template(pipe, low_res, out_names, grid, num_members, chunk_size, members, stats, attrs, member_dim)
            tmp = store.with_name(store.name + f".init-{os.getpid()}")
            tmpl.to_zarr(tmp, mode="w", compute=False, zarr_format=2, consolidated=True, encoding=zarr_encoding(tmpl))
            shutil.rmtree(markers_path(store), ignore_errors=True)  # stale markers of a store deleted by hand
            markers_path(store).mkdir()
            os.replace(tmp, store)  # the store appears complete with its layout, or not at all
    state.wait_for_everyone()

    # 2. This process's share of the pending chunks
    done = _done(store, len(chunks))
    pending = [c for c in chunks if c[0] not in done]
    state.wait_for_everyone()  # every process listed the same pending chunks before any is marked
    with state.split_between_processes(pending) as mine:
        mine = list(mine)
    static = first.static  # validated on the target grid once (derived from packaged data only once)
    t0, steps_done = time.perf_counter(), 0
    bar = tqdm(total=low_res.sizes["time"], initial=sum(b - a for i, a, b in chunks if i in done), unit="step",
               desc="downscale", disable=not (progress and state.is_main_process), dynamic_ncols=True)
    pipe.set_progress_bar_config(disable=True)
    for i, a, b in mine:
        low = low_res.isel(time=slice(a, b)).load()
        out = pipe(low, static_fields=static, num_members=num_members, num_inference_steps=num_inference_steps,
                   generator=torch.Generator().manual_seed(seed), tiles_per_call=tiles_per_call, variable_map=variable_map,
                   member_dim=member_dim, conserve=conserve, noise_time_correlation=noise_time_correlation,
                   noise_time_unit=time_unit)
        region = {}
        for user in out_names:
            m = out.members[user].transpose(member_dim, "time", "lat", "lon")
            if members:
                region[user] = m.astype("float32")
            if stats:
                region[f"{user}_mean"] = out.mean[user].transpose("time", "lat", "lon").astype("float32")
                region[f"{user}_std"] = out.std[user].transpose("time", "lat", "lon").astype("float32")
        ds = xr.Dataset(region)
        ds = ds.drop_vars(list(ds.coords))  # coordinates are in the store already: a region write holds data only
        for v in ds.data_vars:
            if not np.isfinite(ds[v].values).all():  # the input was checked finite: this is a model failure
                raise FloatingPointError(f"Chunk {i} (time steps {a}:{b}) gave non-finite values for {v}; nothing was written.")
            ds[v].attrs = {}
        ds.to_zarr(store, region={"time": slice(a, b)}, mode="r+", zarr_format=2, consolidated=False)
        marker = _marker(store, i)
        marker.with_suffix(f".tmp{os.getpid()}").write_text(json.dumps({"chunk": i, "time": [a, b]}))
        os.replace(marker.with_suffix(f".tmp{os.getpid()}"), marker)  # written after the data: a chunk is done or absent
        steps_done += b - a
        elapsed = time.perf_counter() - t0
        bar.update(b - a)
        bar.set_postfix(members_per_s=f"{steps_done * num_members / max(elapsed, 1e-9):.2f}")
    bar.close()
    elapsed = time.perf_counter() - t0
    state.wait_for_everyone()

    # 3. Finish: every chunk done -> move the store into place (zarr) or stream it to netCDF
    if state.is_main_process:
        left = len(chunks) - len(_done(store, len(chunks)))
        if left:
            raise RuntimeError(f"{left} chunk(s) of {store} are not done; rerun the same command to finish them.")
        _finish(store, output, fmt, overwrite, squeeze_time, output_layout)
    state.wait_for_everyone()
    return ReconstructionResult(
        path=output, chunks_total=len(chunks), chunks_computed=len(mine), seconds=elapsed,
        time_steps_per_minute=60 * steps_done / max(elapsed, 1e-9),
        members_per_second=steps_done * num_members / max(elapsed, 1e-9),
    )


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
    return any(layout.get(d, d) != d for d in ("lat", "lon", "time")) or bool(
        layout.get("lat_descending") or layout.get("lon_descending"))
