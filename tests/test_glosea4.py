"""The glosea4-ts-x4 benchmark on the real GloSea4 data (skipped without the data extra)."""

import numpy as np
import pytest

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
    assert dict(ds.sizes) == {"member": 13, "time": 6, "lat": 145, "lon": 192}
    assert 6 not in ds["member"].values and ds["surface_temperature"].attrs["units"] == "K"
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
        assert h.sizes["member"] * h.sizes["time"] == {"train": 52, "validation": 13, "test": 13}[name]
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
