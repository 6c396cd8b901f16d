"""Reliability of long runs and of untrusted input (SECURITY.md): a resume never mixes inputs, a delivered output is
whole, one run writes an output at a time, write errors are one clear line, and inputs that would give a silent wrong
answer are refused. Tiny model, a 12-step record in 4 chunks: a few seconds each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_low_res, make_pipeline, make_record

from dpdm_diffusers import DownscalingPipeline
from dpdm_diffusers.reconstruct import partial_path, reconstruct
from dpdm_diffusers.run_store import lock_path, markers_path

KW = dict(num_members=2, num_inference_steps=2, seed=0, chunk_size=3, progress=False)


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def record():
    """12 monthly steps on a 6 x 8 coarse grid (24 x 32 fine)."""
    return make_record(12)


@pytest.fixture(scope="module")
def reference(model_dir, record, tmp_path_factory):
    """The uninterrupted run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    reconstruct(load(model_dir), record, out, **KW)
    return xr.open_zarr(out).load()


def load(folder):
    pipe = DownscalingPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dying_after(folder, n_chunks: int, before_dying=None):
    """The pipeline of ``folder``, killed (an exception) on its call number ``n_chunks + 1``."""
    calls = []
    pipe = load(folder)
    real = DownscalingPipeline.__call__

    def call(self, *a, **k):
        calls.append(1)
        if len(calls) > n_chunks:
            if before_dying is not None:
                before_dying()
            raise Killed("simulated kill")
        return real(self, *a, **k)

    pipe.__class__ = type("Dying", (DownscalingPipeline,), {"__call__": call})
    return pipe


def interrupt(folder, low, out, n_chunks=2, **kw):
    with pytest.raises(Killed):
        reconstruct(dying_after(folder, n_chunks), low, out, **{**KW, **kw})
    assert partial_path(out).exists() and not out.exists() and not lock_path(out).exists()


def assert_same(a: xr.Dataset, b: xr.Dataset):
    assert sorted(a.data_vars) == sorted(b.data_vars)
    for v in a.data_vars:
        np.testing.assert_array_equal(a[v].values, b[v].values)


# ---------------------------------------------------------------------------------------------------
# 1. A resume is accepted only for the same run
# ---------------------------------------------------------------------------------------------------
def test_a_resume_on_other_values_coordinates_or_arithmetic_is_refused_and_the_same_run_resumes_under_another_path(
        model_dir, record, reference, tmp_path):
    out = tmp_path / "o.zarr"
    interrupt(model_dir, record, out)
    pipe = load(model_dir)
    corrected = record + 2.0  # "rerun on corrected data"
    corrected["tas"].attrs = record["tas"].attrs
    with pytest.raises(ValueError, match=r"input_values.*the input's values"):
        reconstruct(pipe, corrected, out, **KW)
    shifted = record.assign_coords(lat=record.lat + 15.0)  # another region of the same shape
    with pytest.raises(ValueError, match=r"input_coords"):
        reconstruct(pipe, shifted, out, **KW)
    relabelled = record.assign_coords(time=record.time + np.timedelta64(1, "D"))  # same first/last would not tell
    with pytest.raises(ValueError, match=r"input_coords"):
        reconstruct(pipe, relabelled, out, **KW)
    bf16 = load(model_dir)
    bf16.autocast_dtype = torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype"):
        reconstruct(bf16, record, out, **KW)
    with pytest.raises(ValueError, match=r"conserve"):
        reconstruct(pipe, record, out, conserve=True, **KW)
    # the same weights through a symlink and another model_id: the same run, resumed
    link = tmp_path / "same-model"
    link.symlink_to(model_dir, target_is_directory=True)
    res = reconstruct(load(link), record, out, model_id=str(link), **KW)
    assert res.chunks_computed == 2  # of 4: the two finished chunks were kept
    assert_same(reference, xr.open_zarr(out))
    assert xr.open_zarr(out).attrs["dpdm_model"] == "tiny"  # the folder's name (of the first run), never its path


def test_a_resume_with_other_static_fields_is_refused(tmp_path):
    from conftest import make_static

    from dpdm_diffusers.grids import Grid

    folder = tmp_path / "static-model"
    make_pipeline().save_pretrained(folder)
    low = make_low_res(ntime=6)
    grid = Grid.from_xarray(low).refine(4)
    interrupt(folder, low, tmp_path / "s.zarr", n_chunks=1, static_fields=make_static(grid, seed=1))
    with pytest.raises(ValueError, match=r"static_fields.*--static"):
        reconstruct(load(folder), low, tmp_path / "s.zarr", static_fields=make_static(grid, seed=2), **KW)
    res = reconstruct(load(folder), low, tmp_path / "s.zarr", static_fields=make_static(grid, seed=1), **KW)
    assert res.chunks_computed == 1


def test_overwrite_discards_an_unfinished_run_that_differs_and_an_identical_rerun_still_resumes(
        model_dir, record, tmp_path):
    out = tmp_path / "o.zarr"
    interrupt(model_dir, record, out)
    res = reconstruct(load(model_dir), record, out, overwrite=True, **{**KW, "seed": 1})
    assert res.chunks_computed == 4  # started over
    fresh = reconstruct(load(model_dir), record, tmp_path / "fresh.zarr", **{**KW, "seed": 1})
    assert_same(xr.open_zarr(fresh.path), xr.open_zarr(out))
    again = tmp_path / "again.zarr"
    interrupt(model_dir, record, again)
    assert reconstruct(load(model_dir), record, again, overwrite=True, **KW).chunks_computed == 2


# ---------------------------------------------------------------------------------------------------
# 2. A chunk counts only when it reads back whole; a finished output is checked before it moves into place
# ---------------------------------------------------------------------------------------------------
def chunk_file(store, var, time_chunk, member=0):
    key = f"{member}.{time_chunk}.0.0" if var == "tas" else f"{time_chunk}.0.0"
    return store / var / key


def test_overwritten_or_deleted_chunk_files_are_found_and_recomputed_on_resume(model_dir, record, reference, tmp_path):
    out = tmp_path / "o.zarr"
    interrupt(model_dir, record, out, n_chunks=3)
    store = partial_path(out)
    chunk_file(store, "tas", 0).write_bytes(b"garbage, not blosc")  # overwritten
    chunk_file(store, "tas_mean", 1).unlink()  # deleted: would read back as the fill value
    res = reconstruct(load(model_dir), record, out, **KW)
    assert res.chunks_computed == 3  # chunks 0 and 1 (damaged) and 3 (never done)
    assert_same(reference, xr.open_zarr(out))


def test_a_chunk_damaged_during_the_run_stops_the_delivery_and_the_rerun_repairs_it(model_dir, record, reference,
                                                                                      tmp_path):
    out = tmp_path / "o.zarr"
    store = partial_path(out)
    pipe = load(model_dir)
    real = DownscalingPipeline.__call__
    calls = []

    def call(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:  # the last chunk: damage the first, already verified and marked
            chunk_file(store, "tas_std", 0).write_bytes(b"\0" * 64)
        return real(self, *a, **k)

    pipe.__class__ = type("Saboteur", (DownscalingPipeline,), {"__call__": call})
    with pytest.raises(RuntimeError, match="did not read back whole"):
        reconstruct(pipe, record, out, **KW)
    assert not out.exists()  # never delivered damaged
    assert reconstruct(load(model_dir), record, out, **KW).chunks_computed == 1
    assert_same(reference, xr.open_zarr(out))


def test_fault_injection_random_kills_and_corruption_still_give_the_uninterrupted_result(model_dir, record, reference,
                                                                                         tmp_path):
    rng = np.random.default_rng(7)
    out = tmp_path / "f.nc"
    store = partial_path(out)
    for _ in range(20):
        try:
            reconstruct(dying_after(model_dir, int(rng.integers(0, 3))), record, out, **KW)
            break
        except Killed:
            done = sorted(markers_path(store).glob("*.done"))
            if done and rng.uniform() < 0.5:  # corrupt a random finished chunk between runs
                i = int(json.loads(done[int(rng.integers(len(done)))].read_text())["chunk"])
                chunk_file(store, "tas", i, member=int(rng.integers(2))).write_bytes(os.urandom(100))
    assert out.exists() and not store.exists() and not markers_path(store).exists()
    with xr.open_dataset(out) as got:
        assert_same(reference, got.load())


# ---------------------------------------------------------------------------------------------------
# 3. One run per output; nothing left behind by a refused input
# ---------------------------------------------------------------------------------------------------
def test_one_run_per_output_and_a_stale_lock_is_taken_over(model_dir, record, tmp_path):
    out = tmp_path / "o.zarr"
    lock = lock_path(out)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "started": "now"}))  # live owner
    with pytest.raises(FileExistsError, match=rf"Another dpdm run \(process {os.getpid()}"):
        reconstruct(load(model_dir), record, out, **KW)
    assert not partial_path(out).exists()  # refused before anything was created
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(gone.stdout), "started": "then"}))  # dead
    reconstruct(load(model_dir), record, out, **KW)
    assert out.exists() and not lock.exists()


def test_a_refused_input_leaves_nothing_behind(model_dir, record, tmp_path):
    bad = record.copy(deep=True)
    bad["tas"][10, 2, 3] = np.nan  # in the last chunk: found before any store exists
    out = tmp_path / "o.zarr"
    with pytest.raises(ValueError, match="NaN"):
        reconstruct(load(model_dir), bad, out, **KW)
    twice = xr.concat([record.isel(time=slice(0, 6)), record.isel(time=slice(5, 11))], "time")
    with pytest.raises(ValueError, match="time stamps repeat"):
        reconstruct(load(model_dir), twice, out, **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no .init-*, no markers, no lock


# ---------------------------------------------------------------------------------------------------
# 4. Write errors end as one line naming the path, the bytes left and how to resume
# ---------------------------------------------------------------------------------------------------
def test_a_file_size_limit_mid_run_is_one_line_and_the_same_command_resumes(model_dir, tmp_path):
    low = make_record(6, nlat=24, nlon=24, noise=False)  # 96 x 96 fine: a chunk file (~100 kB) outgrows the metadata
    low.to_netcdf(tmp_path / "low.nc")
    out = tmp_path / "o.zarr"
    argv = ["downscale", str(tmp_path / "low.nc"), "-o", str(out), "--model", str(model_dir), "--members", "2",
            "--steps", "2", "--chunk-size", "3", "--quiet"]
    limited = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, as on a full quota
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # the store's metadata fits, a chunk does not
        from dpdm_diffusers.cli import main
        main({argv!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", limited], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert "Traceback" not in res.stderr and len(err) == 1, res.stderr[-2000:]
    assert "File size limit reached writing" in err[0] and "MB still to write" in err[0]
    assert "rerun the same command to resume" in err[0] and str(partial_path(out)) in err[0]
    again = subprocess.run([sys.executable, "-m", "dpdm_diffusers.cli", *argv], capture_output=True, text=True,
                           env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    whole = tmp_path / "whole.zarr"  # the same command never interrupted
    ref = subprocess.run([sys.executable, "-m", "dpdm_diffusers.cli", *argv[:3], str(whole), *argv[4:]],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert_same(xr.open_zarr(whole), xr.open_zarr(out))


# ---------------------------------------------------------------------------------------------------
# 6. Inputs and configs that gave silent wrong answers, hangs or raw errors
# ---------------------------------------------------------------------------------------------------
def test_masked_conservation_conserves_over_the_valid_cells_of_each_block():
    pipe = make_pipeline(static=())
    low = make_low_res(nlat=8, nlon=8, ntime=1)
    low["tas"][0, 3:5, 3:5] = np.nan  # a masked island: its neighbours' blocks are partly undefined
    out = pipe(low, num_members=3, num_inference_steps=2, nan_policy="mask", conserve=True,
               generator=torch.Generator().manual_seed(0))
    members = out.members.tas.values  # (member, time, 32, 32)
    blocks = members.reshape(3, 1, 8, 4, 8, 4)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        means = np.nanmean(blocks, axis=(3, 5))
    coarse = np.broadcast_to(low.tas.values, means.shape)
    partly = np.isnan(blocks).any(axis=(3, 5)) & ~np.isnan(blocks).all(axis=(3, 5))
    assert partly.any()  # the case of the finding: blocks with both valid and masked cells
    valid = ~np.isnan(means)
    np.testing.assert_allclose(means[valid], coarse[valid], atol=1e-3)  # the finding: 10-25 K off in partly masked blocks


def test_duplicated_time_stamps_in_one_call_are_refused_instead_of_sharing_noise():
    pipe = make_pipeline(static=())
    low = make_low_res(ntime=2)
    low = low.assign_coords(time=[low.time.values[0]] * 2)
    with pytest.raises(ValueError, match="share the coordinates"):
        pipe(low, num_members=2, num_inference_steps=1)


def test_configs_and_arrays_a_shared_folder_could_abuse_are_bounded(tmp_path):
    folder = tmp_path / "m"
    make_pipeline(static=()).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())

    def tamper(name, change):
        bad = tmp_path / name
        make_pipeline(static=()).save_pretrained(bad)
        change(bad)
        return bad

    big = tamper("big", lambda f: (f / "model_index.json").write_text(json.dumps({**index, "pad": "x" * (2 << 20)})))
    with pytest.raises(ValueError, match="is not a model config"):
        DownscalingPipeline.from_pretrained(big)
    huge_std = tamper("std", lambda f: (f / "model_index.json").write_text(json.dumps({**index, "stochastic_std": [1e30]})))
    with pytest.raises(ValueError, match="stochastic_std"):
        DownscalingPipeline.from_pretrained(huge_std)
    for key, value, message in (("block_out_channels", 16, "block_out_channels 16"),
                                ("norm_num_groups", 0, "norm_num_groups 0")):
        bad = tamper(key, lambda f, k=key, v=value: (f / "unet" / "config.json").write_text(json.dumps({**unet_cfg, k: v})))
        with pytest.raises(ValueError, match=message):
            DownscalingPipeline.from_pretrained(bad)
    pipe = make_pipeline()
    low = make_low_res()
    static = np.ones((2, 24, 32), dtype="float32")
    static[0, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"\['topography'\] contain NaN"):
        pipe(low, static_fields=static, num_members=1, num_inference_steps=1)
    with pytest.raises(FileNotFoundError, match="is not a pipeline folder"):
        DownscalingPipeline.from_pretrained(tmp_path / "missing")


def test_temperature_unit_spellings_and_the_cli_mapping_form_are_read_as_meant():
    from dpdm_diffusers.units import parse_units, unit_factor

    assert unit_factor("deg K", "K") == (1.0, 0.0)  # pint alone: 0.0175 K (angle degree x kelvin)
    assert unit_factor("degrees Celsius", "K") == (1.0, 273.15)
    assert str(parse_units("degrees_F")) == "degree_Fahrenheit"
    with pytest.raises(ValueError, match="temperature unambiguously"):
        parse_units("degree * K")
    pipe = make_pipeline(static=())
    low = make_low_res().rename(tas="air")
    low["air"] = (low["air"] - 273.15).assign_attrs(units="degrees Celsius")
    out = pipe(low, variable_map=["air=tas"], num_members=1, num_inference_steps=1)  # the CLI's list form
    assert "air" in out.mean and float(out.mean.air.mean()) > 270  # converted to the model's K and back named


def test_the_memory_guard_counts_the_address_space_limit(tmp_path):
    script = textwrap.dedent("""
        import resource, sys
        import psutil
        sys.path.insert(0, "tests")
        from conftest import make_low_res, make_pipeline, make_record
        pipe = make_pipeline(static=())
        low = make_low_res(nlat=96, nlon=96, ntime=1, lat0=-40.0, step=0.5)
        vms = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vms + 300 * 2**20, resource.RLIM_INFINITY))
        try:
            pipe(low, num_members=64, num_inference_steps=1)
        except MemoryError as err:
            print("refused:", err)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert "refused: This call needs about" in res.stdout and "GiB are free on cpu" in res.stdout, res.stderr[-2000:]


def test_grids_that_gave_misleading_errors(tmp_path):
    from dpdm_diffusers.data import standardize

    pipe = make_pipeline(static=())
    lat = np.arange(-90, 90.1, 10.0)  # pole-centred rows
    lon = np.arange(0, 360, 10.0)
    ds = xr.Dataset({"tas": (("lat", "lon"), np.full((lat.size, lon.size), 280, "f4"), {"units": "K"})},
                    coords={"lat": lat, "lon": lon})
    with pytest.raises(ValueError, match="cells centred on a pole"):
        pipe(ds, num_members=1, num_inference_steps=1)
    wide = make_low_res(nlon=16, lon0=172.0)  # 172.5 .. 187.5 east: across the dateline
    wide = wide.assign_coords(lon=(wide.lon + 180) % 360 - 180).sortby("lon")  # as a -180..180 file holds it
    out = standardize(wide)
    assert np.all(np.diff(out.lon.values) > 0) and out.lon.size == 16  # contiguous across the dateline


def test_dpdm_errors_are_one_line_and_debug_shows_the_traceback(model_dir, tmp_path, monkeypatch, capsys):
    from dpdm_diffusers import workflows
    from dpdm_diffusers.cli import main

    def fails(*a, **k):
        raise RuntimeError("chunk 3 did not read back whole")

    monkeypatch.setattr(workflows, "downscale_file", fails)
    low = tmp_path / "low.nc"
    make_low_res().to_netcdf(low)
    argv = ["downscale", str(low), "-o", str(tmp_path / "o.zarr"), "--model", str(model_dir)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and err[0].startswith("Error: chunk 3 did not read back whole")
    with pytest.raises(RuntimeError, match="did not read back whole"):
        main([*argv, "--debug"])
    monkeypatch.delenv("DPDM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:  # an unknown target is refused before the model samples anything
        main(["calibrate", "--model", str(model_dir), "--target", "spread"])
    assert exit_.value.code == 2 and "Unknown calibration target 'spread'" in capsys.readouterr().err


def test_calibrating_the_shipped_model_on_the_benchmark_warns_that_it_is_in_sample():
    from dpdm_diffusers.workflows import _trained_on_validation_month

    models = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models")
    assert _trained_on_validation_month(os.path.join(models, "dpdm-glosea4-ts-x4"))  # refit on 2011-08..2011-12
    assert not _trained_on_validation_month(os.path.join(models, "dpdm-tigge-5var-x4"))


def test_array_samples_are_keyed_by_position_and_xarray_samples_by_time_as_documented():
    pipe = make_pipeline(static=())
    low = make_low_res(ntime=2)

    def members(x, **kw):
        out = pipe(x, num_members=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kw)
        return np.asarray(out.members.tas.values if hasattr(out.members, "tas") else out.members)

    as_xarray = members(low)  # (member, time, lat, lon)
    as_array = members(low.tas.values[:, None], output_type="np")  # (member, batch, var, lat, lon)
    assert np.array_equal(as_array, members(low.tas.values[:, None], output_type="np"))  # reproducible
    assert not np.allclose(as_array[:, :, 0], as_xarray)  # other keys, other members
    later = members(low.isel(time=[1]))  # by time: the second step alone gets the same members as in the pair
    np.testing.assert_allclose(later[:, 0], as_xarray[:, 1], atol=1e-5)
    first_alone = members(low.tas.values[1:2, None], output_type="np")  # by position: "#0" now, not "#1"
    assert not np.allclose(first_alone[:, 0, 0], as_array[:, 1, 0])


def test_a_scalar_member_coordinate_is_kept_under_another_name_instead_of_crashing_after_sampling():
    pipe = make_pipeline(static=())
    low = make_low_res().assign_coords(member=3)  # e.g. `.isel(member=3)` of an ensemble file
    out = pipe(low, num_members=2, num_inference_steps=1)
    assert out.members.sizes["member"] == 2 and int(out.members["input_member"]) == 3


def test_an_output_in_a_folder_that_does_not_exist_yet_is_written(model_dir, record, tmp_path):
    out = tmp_path / "new" / "folder" / "o.zarr"  # the lock file goes beside the output: its folder is made first
    reconstruct(load(model_dir), record.isel(time=slice(0, 3)), out, **KW)
    assert out.exists() and not lock_path(out).exists()
