"""The glosea4-ts-x4 benchmark on the real GloSea4 data (skipped without the data extra)."""

import numpy as np
import pytest
import xarray as xr

pytest.importorskip("iris", reason="needs the data extra: pip install 'dpdm-diffusers[data]'")
pytest.importorskip("iris_sample_data", reason="needs the data extra: pip install 'dpdm-diffusers[data]'")

from dpdm_diffusers import glosea4  # noqa: E402
from dpdm_diffusers.grids import block_mean  # noqa: E402
from dpdm_diffusers.statistics import compute_statistics  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    return glosea4.load_glosea4_benchmark(static=False)


def test_native_data_is_13_members_by_6_months():
    ds = glosea4.load_glosea4()
    # `realization`, not `member`: the benchmark goes into the pipeline, whose ensemble dim is `member`, as it is
    assert dict(ds.sizes) == {"realization": 13, "time": 6, "lat": 145, "lon": 192}
    assert 6 not in ds["realization"].values and ds["realization"].attrs["standard_name"] == "realization"
    assert ds["surface_temperature"].attrs["units"] == "K"
    assert 190 < float(ds["surface_temperature"].min()) and float(ds["surface_temperature"].max()) < 330


def test_benchmark_grids_splits_and_low_res(bench):
    hr, lr = bench.high_res, bench.low_res
    assert (hr.sizes["lat"], hr.sizes["lon"]) == (144, 192) and (lr.sizes["lat"], lr.sizes["lon"]) == (36, 48)
    assert hr["lat"].values[0] == -90 and hr["lat"].values[-1] == 88.75  # North Pole row dropped
    assert bench.grid.periodic and bench.scale_factor == 4
    np.testing.assert_allclose(lr["surface_temperature"].values, block_mean(hr["surface_temperature"].values, 4), rtol=1e-6)
    months = {}
    for name in glosea4.SPLITS:
        h, low = bench.split(name)
        months[name] = list(np.datetime_as_string(h["time"].values, unit="M"))
        assert h.sizes["realization"] * h.sizes["time"] == {"train": 52, "validation": 13, "test": 13}[name]
        np.testing.assert_array_equal(h["time"].values, low["time"].values)
    assert months == {"train": ["2011-08", "2011-09", "2011-10", "2011-11"], "validation": ["2011-12"],
                      "test": ["2012-01"]}


def test_lerp_rmse_on_the_test_month_matches_data_md(bench):
    truth, _ = bench.split("test")
    lerp = bench.split_lerp("test", "bilinear").compute()
    assert lerp.sizes == truth.sizes
    rmse = glosea4.lerp_rmse(truth, lerp)
    assert rmse == pytest.approx(1.871, abs=0.0015)  # DATA.md's reference figure
    for region in ("east_asia", "gulf_coast", "northern_australia"):
        assert 0.3 < glosea4.lerp_rmse(truth, lerp, region) < 5


def test_training_statistics_exclude_the_test_month(bench):
    h, _ = bench.split("train")
    stats = compute_statistics(h, bench.split_lerp("train"))
    ht, _ = bench.split("test")
    np.testing.assert_allclose(stats["norm_mean"][0], float(h["surface_temperature"].astype("f8").mean()), rtol=1e-9)
    assert abs(stats["norm_mean"][0] - float(ht["surface_temperature"].mean())) > 0.1
    assert 0 < stats["residual_std"][0] < 0.2  # the block-mean residual is a small fraction of the field's spread


def test_a_netcdf_copy_loads_the_same_benchmark_without_iris(tmp_path, monkeypatch):
    """GPU nodes without iris/pvlib read the benchmark from one file (save_glosea4_netcdf)."""
    path = glosea4.save_glosea4_netcdf(tmp_path / "glosea4.nc")
    packaged = glosea4.load_glosea4_benchmark()
    monkeypatch.setenv(glosea4.NETCDF_ENV, str(path))
    monkeypatch.setattr(glosea4, "_read_members", None)  # the copy must not touch the .pp reader
    copy = glosea4.load_glosea4_benchmark()
    for a, b in ((packaged.high_res, copy.high_res), (packaged.low_res, copy.low_res), (packaged.static, copy.static)):
        xr.testing.assert_identical(a.drop_attrs(deep=False), b.drop_attrs(deep=False))
    legacy = tmp_path / "legacy.nc"  # a copy written when the ensemble dim was still named `member`
    with xr.open_dataset(path) as f:
        f.rename(realization="member").to_netcdf(legacy)
    xr.testing.assert_identical(glosea4.load_glosea4_benchmark(legacy, static=False).high_res, copy.high_res)
    other = tmp_path / "other.nc"
    packaged.high_res.to_netcdf(other)
    with pytest.raises(ValueError, match="not a glosea4-ts-x4 copy"):
        glosea4.load_glosea4_benchmark(other)


def test_training_ranges_never_reach_the_test_month():
    from dpdm_diffusers.training.config import TrainingConfig, glosea4_splits

    cfg = TrainingConfig(dataset="glosea4-ts-x4")
    assert glosea4_splits(cfg) == (("2011-08", "2011-11"), ("2011-12", "2011-12"))
    refit = TrainingConfig(dataset="glosea4-ts-x4", train_time=["2011-08", "2011-12"])
    assert glosea4_splits(refit) == (("2011-08", "2011-12"), None)  # no validation month is left
    for bad in ({"train_time": ["2011-08", "2012-01"]}, {"train_time": ["2011-08", "2012-01-15"]},
                {"validation_time": ["2011-12", "2012-02"]}):
        with pytest.raises(ValueError, match="test month 2012-01"):
            glosea4_splits(TrainingConfig(dataset="glosea4-ts-x4", **bad))
