"""Long reconstructions: streamed chunks, resume after a failure or a kill, chunk invariance, refusal to mix runs,
two processes, netCDF and zarr, atomic outputs (tiny model, a few seconds each)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_record

from dpdm_diffusers import DownscalingPipeline
from dpdm_diffusers.reconstruct import markers_path, partial_path, reconstruct

KW = dict(num_members=3, num_inference_steps=2, seed=0, progress=False)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    """A 30-step monthly record on a 6 x 8 coarse grid (24 x 32 fine)."""
    path = tmp_path_factory.mktemp("data") / "record.nc"
    make_record(30).to_netcdf(path)
    return path


def load(model_dir):
    pipe = DownscalingPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_streamed_chunks_equal_one_call_and_carry_cf_and_run_attributes(model_dir, record, tmp_path):
    pipe, low = load(model_dir), xr.open_dataset(record)
    res = reconstruct(pipe, low, tmp_path / "out.zarr", chunk_size=7, model_id="tiny", **KW)
    assert res.chunks_total == 5 and res.chunks_computed == 5 and not partial_path(tmp_path / "out.zarr").exists()
    out = xr.open_zarr(tmp_path / "out.zarr")
    whole = pipe(low, num_members=3, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    # keyed noise: a time step's members do not depend on the chunk that produced them
    np.testing.assert_allclose(out.tas.values, whole.members.tas.transpose("member", "time", "lat", "lon").values, atol=1e-4)
    np.testing.assert_allclose(out.tas_mean.values, whole.mean.tas.values, atol=1e-4)
    assert out.tas.dims == ("member", "time", "lat", "lon") and out.tas.attrs["units"] == "K"
    assert out.tas_std.attrs["cell_methods"] == "member: standard_deviation"
    assert out.attrs["Conventions"] == "CF-1.8" and out.attrs["dpdm_model"] == "tiny"
    assert out.attrs["dpdm_num_members"] == 3 and out.attrs["dpdm_seed"] == 0 and "dpdm_version" in out.attrs
    assert out.tas.encoding["chunks"][:2] == (1, 7)  # one member x one chunk of time steps per zarr chunk
    np.testing.assert_array_equal(out.time.values, low.time.values)


def test_a_failure_mid_run_resumes_without_recomputing_and_equals_an_uninterrupted_run(model_dir, record, tmp_path):
    pipe, low = load(model_dir), xr.open_dataset(record)
    full = reconstruct(pipe, low, tmp_path / "full.zarr", chunk_size=7, **KW)
    calls, real = [], pipe.__call__

    class Killed(RuntimeError):
        pass

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Killed("simulated kill")
        return real(*a, **k)

    flaky = load(model_dir)
    flaky.__class__ = type("Flaky", (DownscalingPipeline,), {"__call__": lambda self, *a, **k: dying(*a, **k)})
    with pytest.raises(Killed):
        reconstruct(flaky, low, tmp_path / "part.zarr", chunk_size=7, **KW)
    assert not (tmp_path / "part.zarr").exists() and partial_path(tmp_path / "part.zarr").exists()
    res = reconstruct(pipe, low, tmp_path / "part.zarr", chunk_size=7, **KW)
    assert res.chunks_computed == 3  # the two finished chunks were not recomputed
    a, b = xr.open_zarr(full.path), xr.open_zarr(res.path)
    for v in a.data_vars:
        np.testing.assert_array_equal(a[v].values, b[v].values)


def test_a_rerun_with_other_settings_is_refused_instead_of_mixing(model_dir, record, tmp_path):
    pipe, low = load(model_dir), xr.open_dataset(record)
    store = partial_path(tmp_path / "o.zarr")
    flaky = load(model_dir)
    flaky.__class__ = type("Dies", (DownscalingPipeline,), {"__call__": lambda self, *a, **k: (_ for _ in ()).throw(OSError("x"))})
    with pytest.raises(OSError):
        reconstruct(flaky, low, tmp_path / "o.zarr", chunk_size=7, **KW)
    assert store.exists()
    with pytest.raises(ValueError, match=r"differ in \['seed'\]"):
        reconstruct(pipe, low, tmp_path / "o.zarr", chunk_size=7, **{**KW, "seed": 1})
    with pytest.raises(ValueError, match="num_members"):
        reconstruct(pipe, low, tmp_path / "o.zarr", chunk_size=7, **{**KW, "num_members": 4})


def test_netcdf_output_streams_too_and_an_old_output_survives_a_failed_overwrite(model_dir, record, tmp_path):
    pipe, low = load(model_dir), xr.open_dataset(record)
    nc = reconstruct(pipe, low, tmp_path / "out.nc", chunk_size=10, **KW).path
    zr = reconstruct(pipe, low, tmp_path / "out.zarr", chunk_size=10, **KW).path
    with xr.open_dataset(nc) as a, xr.open_zarr(zr) as b:
        np.testing.assert_array_equal(a.tas.values, b.tas.values)
        assert a.tas.encoding["zlib"] and a.tas.encoding["chunksizes"][:2] == (1, 10)
    before = (tmp_path / "out.nc").read_bytes()
    with pytest.raises(FileExistsError):
        reconstruct(pipe, low, tmp_path / "out.nc", chunk_size=10, **KW)
    flaky = load(model_dir)
    flaky.__class__ = type("Dies", (DownscalingPipeline,), {"__call__": lambda self, *a, **k: (_ for _ in ()).throw(OSError("disk"))})
    with pytest.raises(OSError):
        reconstruct(flaky, low, tmp_path / "out.nc", chunk_size=10, overwrite=True, **KW)
    assert (tmp_path / "out.nc").read_bytes() == before  # the old output is intact until a new one is complete


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "dpdm_diffusers.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, **kw)


@pytest.mark.heavy
def test_sigkill_then_the_same_command_finishes_with_an_identical_result(model_dir, record, tmp_path):
    args = ["downscale", record, "--model", model_dir, "--members", 3, "--steps", 2, "--chunk-size", 2, "--quiet",
            "--scheduler", "ddim"]
    ref = cli(*args, "-o", tmp_path / "ref.zarr")
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "dpdm_diffusers.cli", *map(str, args), "-o", str(out)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = markers_path(partial_path(out))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(markers.glob("*.done"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(markers.glob("*.done")))
    assert 0 < done < 15, "the kill should land mid-run"
    again = cli(*args, "-o", out)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = xr.open_zarr(tmp_path / "ref.zarr"), xr.open_zarr(out)
    for v in a.data_vars:
        np.testing.assert_array_equal(a[v].values, b[v].values)


@pytest.mark.heavy
def test_two_processes_split_the_chunks_and_equal_one_process(model_dir, record, tmp_path):
    # one thread each (torchrun sets one per process): the same arithmetic, so the result is bit-identical
    args = ["--members", 2, "--steps", 2, "--chunk-size", 4, "--quiet", "--model", model_dir, "--scheduler", "ddim", "--threads", 1]
    one = cli("downscale", record, "-o", tmp_path / "one.zarr", *args)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "-m", "dpdm_diffusers.cli", "downscale", str(record), "-o", str(tmp_path / "two.zarr"), *map(str, args)]
    two = subprocess.run(torchrun, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = xr.open_zarr(tmp_path / "one.zarr"), xr.open_zarr(tmp_path / "two.zarr")
    for v in a.data_vars:
        np.testing.assert_array_equal(a[v].values, b[v].values)
    assert "this process" in two.stdout  # the main process reports; chunks were shared (4 of 8 each)


def test_scalar_and_time_coordinates_carry_through_a_streamed_run(model_dir, record, tmp_path):
    pipe = load(model_dir)
    low = xr.open_dataset(record).assign_coords(height=1.5, forecast_period=("time", np.arange(30)))
    out = xr.open_zarr(reconstruct(pipe, low, tmp_path / "o.zarr", chunk_size=8, **KW).path)
    assert float(out.height) == 1.5 and out.forecast_period.values.tolist() == list(range(30))
