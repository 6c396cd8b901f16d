"""Training samples: crops (periodic seam), masks, flips with sign handling, Arrow dataset, offline push."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from dpdm_diffusers.samples import (
    ArrowFields,
    RandomPatchDataset,
    build_hf_dataset,
    normalize_fields,
    read_metadata,
    vector_components,
)
from dpdm_diffusers.transforms import Normalizer

NY, NX, P = 12, 24, 8
LAT = np.arange(-82.5, 90, 15.0)           # 12 rows
LON_GLOBAL = np.arange(0, 360, 15.0)       # 24 columns, periodic
LON_REGIONAL = np.arange(100, 124, 1.0)    # 24 columns, not periodic


def make(lon=LON_GLOBAL, variables=("t2m", "u10"), n_time=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (2, n_time, NY, NX)  # member, time, lat, lon
    coords = {"member": [0, 5], "time": pd.date_range("2010-01-01", periods=n_time, freq="MS"), "lat": LAT, "lon": lon}
    dims = ("member", "time", "lat", "lon")
    hr = xr.Dataset({v: (dims, rng.normal(280 if v == "t2m" else 3, 5, shape).astype("f4"),
                         {"units": "K" if v == "t2m" else "m s-1"}) for v in variables}, coords=coords)
    lerp = hr + xr.Dataset({v: (dims, rng.normal(0, 1, shape).astype("f4")) for v in variables}, coords=coords)
    static = xr.Dataset(
        {"topography": (("lat", "lon"), rng.random((NY, NX)).astype("f4") * 3000),
         "land_sea_mask": (("lat", "lon"), (rng.random((NY, NX)) > 0.5).astype("f4"))},
        coords={"lat": LAT, "lon": lon},
    )
    nz = Normalizer(
        variables=list(variables), transforms=["identity"] * len(variables),
        mean=[280.0, 3.0][: len(variables)], std=[5.0, 5.0][: len(variables)],
        residual_std=[0.2, 0.2][: len(variables)], static_channels=["topography", "land_sea_mask"],
        static_mean=[1500.0, 0.5], static_std=[900.0, 0.5],
    )
    return hr, lerp, static, nz


def stacked(ds):
    """(N, V, H, W) physical array, samples member-major as normalize_fields stacks them."""
    arr = ds.to_array("v").transpose("member", "time", "v", "lat", "lon").values.astype("f4")
    return torch.from_numpy(arr.reshape(-1, *arr.shape[2:]))


def expected_item(hr, lerp, static, nz, item, p=P, flip_lon=False):
    """Target/condition computed independently: crop physical fields (modular columns) then Normalizer."""
    if isinstance(hr, xr.Dataset):
        hr, lerp, static = stacked(hr), stacked(lerp), torch.from_numpy(static.to_array("c").values)
    n, y, x = int(item["sample"]), int(item["y"]), int(item["x"])
    cols = torch.from_numpy((x + np.arange(p)) % NX)
    h, l, s = hr[n, :, y:y + p][..., cols], lerp[n, :, y:y + p][..., cols], static[:, y:y + p][..., cols]
    if flip_lon:
        h, l, s = h.flip(-1), l.flip(-1), s.flip(-1)
        sign = torch.tensor([1.0, -1.0]).view(-1, 1, 1)  # eastward wind changes sign
        h, l = h * sign, l * sign
    return nz.to_model_space(h, l), nz.condition(l, s)


def test_items_match_normalizer_on_the_crop_and_cover_the_periodic_seam():
    hr, lerp, static, nz = make()
    fields = normalize_fields(hr, lerp, nz, static)
    assert fields.periodic and fields.target.shape == (6, 2, NY, NX)
    assert list(fields.coords) == ["member", "time"] and list(fields.coords["member"]) == [0, 0, 0, 5, 5, 5]
    ds = RandomPatchDataset(fields, P, samples_per_epoch=300, seed=3)
    phys = stacked(hr), stacked(lerp), torch.from_numpy(static.to_array("c").values)
    wrapped = 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["target"].shape == (2, P, P) and item["condition"].shape == (4, P, P)
        assert item["target"].dtype == torch.float32 and item["mask"].dtype == torch.bool
        target, condition = expected_item(*phys, nz, item)
        torch.testing.assert_close(item["target"], target, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item["condition"], condition, rtol=1e-5, atol=1e-5)
        wrapped += item["x"] + P > NX
    assert wrapped > 20  # patches straddling the 360/0 seam are drawn and correct


def test_regional_grid_never_wraps():
    hr, lerp, static, nz = make(lon=LON_REGIONAL)
    fields = normalize_fields(hr, lerp, nz, static)
    assert not fields.periodic
    ds = RandomPatchDataset(fields, P, samples_per_epoch=200)
    xs = [ds[i]["x"] for i in range(len(ds))]
    assert max(xs) == NX - P and min(xs) == 0


def test_missing_values_are_masked_and_zero_filled_never_nan():
    hr, lerp, static, nz = make(variables=("t2m",))
    hr["t2m"][..., :, :6] = np.nan      # "ocean" columns of the target
    lerp["t2m"][..., :2, :] = np.nan     # interpolated low-res missing in the first two rows
    fields = normalize_fields(hr, lerp, nz, static)
    ds = RandomPatchDataset(fields, P, samples_per_epoch=100, seed=1)
    for i in range(len(ds)):
        item = ds[i]
        x, y = item["x"], item["y"]
        cols, rows = (x + np.arange(P)) % NX, y + np.arange(P)
        expect_valid = (cols[None, :] >= 6) & (rows[:, None] >= 2)
        np.testing.assert_array_equal(item["mask"][0].numpy(), expect_valid)
        assert torch.isfinite(item["target"]).all() and torch.isfinite(item["condition"]).all()
        assert (item["target"][0][~item["mask"][0]] == 0).all()
        assert (item["condition"][0].numpy()[rows < 2] == 0).all()


def test_min_valid_fraction_redraws_mostly_missing_patches():
    hr, lerp, static, nz = make(variables=("t2m",))
    hr["t2m"][..., :, 8:] = np.nan  # two thirds missing
    fields = normalize_fields(hr, lerp, nz, static)
    plain = RandomPatchDataset(fields, P, samples_per_epoch=200, seed=0)
    picky = RandomPatchDataset(fields, P, samples_per_epoch=200, seed=0, min_valid_fraction=0.75, max_tries=50)
    frac = lambda d: np.mean([d[i]["mask"].float().mean().item() for i in range(len(d))])  # noqa: E731
    assert frac(plain) < 0.5 and frac(picky) >= 0.75


def test_determinism_epochs_and_dataloader_batches():
    hr, lerp, static, nz = make()
    fields = normalize_fields(hr, lerp, nz, static)
    a = RandomPatchDataset(fields, P, samples_per_epoch=64, seed=7)
    b = RandomPatchDataset(fields, P, samples_per_epoch=64, seed=7)
    assert all(torch.equal(a[i]["target"], b[i]["target"]) for i in range(10))
    before = [(a[i]["sample"], a[i]["y"], a[i]["x"]) for i in range(10)]
    a.set_epoch(1)
    assert [(a[i]["sample"], a[i]["y"], a[i]["x"]) for i in range(10)] != before
    batch = next(iter(torch.utils.data.DataLoader(b, batch_size=16)))
    assert batch["target"].shape == (16, 2, P, P) and batch["condition"].shape == (16, 4, P, P)
    with pytest.raises(ValueError, match="positive"):
        RandomPatchDataset(fields, 0)
    # a domain smaller than the patch is padded (as the pipeline pads at inference); padding is never valid
    padded = RandomPatchDataset(fields, NY + 1)[0]
    assert padded["target"].shape[-2] == NY + 1 and not padded["mask"][:, NY:].any()


def test_flips_are_off_by_default_and_flip_winds_with_sign():
    hr, lerp, static, nz = make()
    fields = normalize_fields(hr, lerp, nz, static, metadata={"standard_names": ["", "eastward_wind"]})
    assert RandomPatchDataset(fields, P).flips == ()
    ds = RandomPatchDataset(fields, P, samples_per_epoch=80, flips=("lon",), seed=2)
    hr, lerp, static = stacked(hr), stacked(lerp), torch.from_numpy(static.to_array("c").values)
    flipped = 0
    for i in range(len(ds)):
        item = ds[i]
        plain_t, plain_c = expected_item(hr, lerp, static, nz, item)
        if torch.allclose(item["target"], plain_t, atol=1e-5) and torch.allclose(item["condition"], plain_c, atol=1e-5):
            continue
        t, c = expected_item(hr, lerp, static, nz, item, flip_lon=True)
        torch.testing.assert_close(item["target"], t, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(item["condition"], c, rtol=1e-4, atol=1e-4)
        flipped += 1
    assert 20 < flipped < 60  # about half


def test_flip_sign_handling_for_full_prediction():
    hr, lerp, static, nz = make()
    nz.prediction = "full"
    fields = normalize_fields(hr, lerp, nz, static)
    ds = RandomPatchDataset(fields, P, samples_per_epoch=40, flips=("lon",), seed=4)
    checked = 0
    for i in range(len(ds)):
        item = ds[i]
        t, _ = expected_item(hr, lerp, static, nz, item, flip_lon=True)
        if torch.allclose(item["target"], t, atol=1e-4):
            checked += 1
    assert checked > 10  # -x normalises to -z - 2 mean/std, not -z


def test_vector_component_detection_and_refusals():
    assert vector_components(["u10", "v10", "t2m", "uas", "100v", "10m_u_component_of_wind"]) == {
        "u10": "x", "v10": "y", "uas": "x", "100v": "y", "10m_u_component_of_wind": "x"}
    assert vector_components(["a", "b"], ["eastward_wind", "northward_sea_water_velocity"]) == {"a": "x", "b": "y"}
    hr, lerp, static, nz = make(variables=("t2m", "wdir"))
    hr["wdir"].attrs["standard_name"] = "wind_from_direction"  # a direction cannot change sign
    fields = normalize_fields(hr, lerp, nz, static)
    with pytest.raises(ValueError, match="Refusing to flip 'wdir'"):
        RandomPatchDataset(fields, P, flips=("lon",))
    RandomPatchDataset(fields, P)  # fine without flips
    RandomPatchDataset(fields, P, flips=("lat",), vector_components={"wdir": "x"})  # explicit sign handling
    nz_log = Normalizer(variables=["t2m", "u10"], transforms=["identity", "log1p"], mean=[0, 0], std=[1, 1],
                        static_channels=["topography", "land_sea_mask"], static_mean=[0, 0], static_std=[1, 1])
    hr2, lerp2, static2, _ = make()
    with pytest.raises(ValueError, match="identity transform"):
        RandomPatchDataset(normalize_fields(hr2, lerp2, nz_log, static2), P, flips=("lon",))
    with pytest.raises(ValueError, match="Unknown flip"):
        RandomPatchDataset(fields, P, flips=("time",))


@pytest.fixture
def hf_dataset(tmp_path):
    hr, lerp, static, nz = make()
    hr["t2m"][..., :3] = np.nan
    fields = normalize_fields(hr, lerp, nz, static)
    # lazy (dask) inputs streamed two samples at a time: nothing needs to fit in memory at once
    ds = build_hf_dataset(hr.chunk({"time": 1}), lerp.chunk({"time": 1}), nz, static, chunk_size=2,
                          metadata={"scale_factor": 4, "split": "train"}, cache_dir=str(tmp_path / "cache"))
    return fields, ds


def test_hf_dataset_cache_is_reused_only_for_identical_inputs(tmp_path):
    hr, lerp, static, nz = make()
    cache = str(tmp_path / "cache")
    first = build_hf_dataset(hr, lerp, nz, static, cache_dir=cache)
    again = build_hf_dataset(hr, lerp, nz, static, cache_dir=cache)
    assert again.cache_files == first.cache_files
    changed = build_hf_dataset(hr + 1.0, lerp, nz, static, cache_dir=cache)
    assert changed.cache_files != first.cache_files
    assert not np.array_equal(changed.with_format("numpy")[0]["target"], first.with_format("numpy")[0]["target"])


def test_hf_dataset_columns_metadata_memory_map_and_save_to_disk(hf_dataset, tmp_path):
    import datasets

    fields, ds = hf_dataset
    assert len(ds) == 6 and ds.cache_files, "the table must live in a memory-mapped Arrow file"
    assert {"target", "mask", "condition", "lerp_mask", "sample", "member", "time", "metadata"} <= set(ds.column_names)
    row = ds.with_format("numpy")[4]
    np.testing.assert_array_equal(row["mask"], np.isfinite(fields.target[4]))
    np.testing.assert_allclose(row["target"], np.nan_to_num(fields.target[4]))
    np.testing.assert_allclose(row["condition"], np.concatenate([fields.lerp[4], fields.static]))
    assert ds[4]["member"] == 5 and ds[4]["time"].startswith("2010-02")
    meta = read_metadata(ds)
    assert meta["variables"] == ["t2m", "u10"] and meta["scale_factor"] == 4 and meta["periodic"] is True
    assert Normalizer.from_config(meta).residual_std == [0.2, 0.2]
    ds.save_to_disk(tmp_path / "saved")
    back = datasets.load_from_disk(str(tmp_path / "saved"))
    assert read_metadata(back) == meta
    np.testing.assert_array_equal(back.with_format("numpy")[2]["target"], ds.with_format("numpy")[2]["target"])


def test_arrow_fields_crop_like_memory_and_load(hf_dataset):
    fields, ds = hf_dataset
    arrow = ArrowFields(ds)
    mem = RandomPatchDataset(fields, P, samples_per_epoch=40, seed=5)
    mapped = RandomPatchDataset(arrow, P, samples_per_epoch=40, seed=5)
    for i in range(len(mem)):
        for k in ("target", "condition", "mask"):
            assert torch.equal(mem[i][k], mapped[i][k])
    loaded = arrow.load()
    np.testing.assert_array_equal(loaded.target, fields.target)
    np.testing.assert_array_equal(loaded.lerp, fields.lerp)
    np.testing.assert_array_equal(loaded.coords["member"], fields.coords["member"])
    shuffled = ArrowFields(ds.shuffle(seed=0))  # index mappings are flattened, rows stay consistent
    n = int(ds.shuffle(seed=0)[0]["sample"])
    np.testing.assert_array_equal(shuffled.crop(0, 0, 20, P)[0], fields.crop(n, 0, 20, P)[0])


def test_push_to_hub_offline_with_a_local_hub(hf_dataset, tmp_path, monkeypatch):
    """push_to_hub against a mocked Hub that stores uploads in a folder; the parquet shards reload intact."""
    import datasets
    import datasets.arrow_dataset as arrow_dataset
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from huggingface_hub import HfApi
    from huggingface_hub.utils import RepositoryNotFoundError

    fields, ds = hf_dataset
    hub = tmp_path / "hub"
    repo_dir = hub / "datasets" / "me" / "dpdm-samples@local"
    repo_dir.mkdir(parents=True)
    created = []

    def repo_info(self, repo_id, **kw):
        if not created:
            raise RepositoryNotFoundError("not found", response=SimpleNamespace(headers={}, status_code=404, request=None))
        return SimpleNamespace(id=repo_id, sha="local")

    def create_repo(self, repo_id, **kw):
        created.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def preupload_lfs_files(self, repo_id, additions, **kw):
        for op in additions:  # the temporary parquet file is deleted right after this call
            dest = repo_dir / op.path_in_repo
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(Path(op.path_or_fileobj).read_bytes())

    def create_commit(self, repo_id, operations, **kw):
        for op in operations:
            if isinstance(op.path_or_fileobj, bytes):  # README.md (dataset card)
                (repo_dir / op.path_in_repo).write_bytes(op.path_or_fileobj)
        return SimpleNamespace(oid="local", commit_url="local://commit")

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "preupload_lfs_files", preupload_lfs_files)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(arrow_dataset, "HfFileSystem", lambda **kw: DirFileSystem(str(hub), LocalFileSystem()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    ds.push_to_hub("me/dpdm-samples", token="offline-test")

    shards = sorted((repo_dir / "data").glob("train-*.parquet"))
    assert shards and created == ["me/dpdm-samples"]
    assert "dataset_info" in (repo_dir / "README.md").read_text()
    back = datasets.Dataset.from_parquet([str(s) for s in shards], cache_dir=str(tmp_path / "pq"))
    assert read_metadata(back) == read_metadata(ds)
    np.testing.assert_array_equal(back.with_format("numpy")["target"], ds.with_format("numpy")["target"])
    np.testing.assert_array_equal(back.with_format("numpy")["mask"], ds.with_format("numpy")["mask"])
    assert json.loads(back[0]["metadata"])["norm_mean"] == [280.0, 3.0]
