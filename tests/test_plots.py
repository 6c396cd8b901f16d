"""Figures: PNG files are written, are real images of sensible size, and react to their inputs."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib.image import imread

from dpdm_diffusers import metrics as M
from dpdm_diffusers import plots as P


def _fields(ny=12, nx=16, members=3, seed=0):
    rng = np.random.default_rng(seed)
    lat = np.linspace(40.0, 10.0, ny)  # descending, as many climate files are
    lon = np.linspace(100.0, 140.0, nx)
    base = 290 + 10 * np.cos(np.deg2rad(lat))[:, None] + np.sin(np.deg2rad(8 * lon))[None, :]
    coords = {"lat": lat, "lon": lon}
    truth = xr.DataArray(base + rng.normal(size=(ny, nx)), dims=("lat", "lon"), coords=coords)
    truth[:2, :3] = np.nan  # a masked corner
    ens = xr.DataArray(
        base[None] + rng.normal(size=(members, ny, nx)), dims=("member", "lat", "lon"), coords=coords
    ).where(truth.notnull())
    lerp = (truth + 0.5).where(truth.notnull())
    land = xr.DataArray((np.add.outer(np.arange(ny), np.arange(nx)) > 12).astype(float), dims=("lat", "lon"), coords=coords)
    return truth, lerp, ens, land


def _check_png(path, min_bytes=5_000, min_px=(150, 200)):
    assert path.exists()
    assert path.stat().st_size > min_bytes
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_px[0] and img.shape[1] >= min_px[1]
    # not a blank canvas: many distinct colours
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 50
    return img


def test_plot_maps_writes_png_and_land_contour_changes_it(tmp_path):
    truth, lerp, ens, land = _fields()
    kw = dict(title="ts test", units="K", dpi=50)
    args = (truth, lerp, ens.isel(member=0), ens.mean("member"), ens.std("member"))
    p1 = P.plot_maps(*args, tmp_path / "sub" / "maps.png", **kw)
    p2 = P.plot_maps(*args, tmp_path / "maps_land.png", land_fraction=land, **kw)
    img1, img2 = _check_png(p1), _check_png(p2)
    assert img1.shape[1] > img1.shape[0]  # 3 panels wide, 2 high
    assert img1.shape == img2.shape and not np.array_equal(img1, img2)  # the contour was drawn


def test_plot_maps_accepts_missing_panels_and_rejects_3d(tmp_path):
    truth, lerp, ens, _ = _fields()
    p = P.plot_maps(truth, None, None, ens.mean("member"), ens.std("member"), tmp_path / "m.png", dpi=40)
    _check_png(p, min_bytes=3_000)
    with pytest.raises(ValueError, match="2-D"):
        P.plot_maps(truth, lerp, ens, ens.mean("member"), ens.std("member"), tmp_path / "bad.png")


def test_plot_skill_vs_members_from_dataframe_and_dict(tmp_path):
    rows = [
        {"members": n, "metric": m, "region": r, "value": v}
        for r, off in (("global", 0.0), ("east_asia", 0.1))
        for m, vals in (("RMSE", [1.3, 1.0, 0.9, 0.88]), ("ACC", [0.7, 0.8, 0.85, 0.86]), ("CRPS", [1.0, 0.6, 0.5, 0.5]))
        for n, v in zip([1, 4, 16, 32], vals)
        for v in [v + off]
    ]
    p = P.plot_skill_vs_members(pd.DataFrame(rows), tmp_path / "skill.png", baselines={"Lerp": {"RMSE": 1.1}}, dpi=50)
    img = _check_png(p)
    assert img.shape[1] > 2 * img.shape[0]  # three panels side by side
    p2 = P.plot_skill_vs_members({1: 1.3, 4: 1.0, 33: 0.9}, tmp_path / "single.png", baselines={"Lerp": 1.1}, dpi=50)
    img2 = _check_png(p2, min_px=(100, 150))
    assert img2.shape[1] < img.shape[1]  # one panel only
    with pytest.raises(ValueError):
        P.plot_skill_vs_members(pd.DataFrame({"n": [1], "value": [1.0]}), tmp_path / "bad.png")


def test_plot_power_spectra(tmp_path):
    truth, lerp, ens, _ = _fields(ny=32, nx=32)
    spectra = {
        "truth": M.power_spectrum(truth),
        "Lerp": M.power_spectrum(lerp),
        "members": M.power_spectrum(ens, dims=[]),  # extra dims are averaged by the plot
        "raw pair": (np.array([0.1, 0.2, 0.4]), np.array([3.0, 2.0, 1.0])),
    }
    p = P.plot_power_spectra(spectra, tmp_path / "spec.png", title="spectra", dpi=50)
    _check_png(p)
