"""The ``glosea4-ts-x4`` benchmark: real GloSea4 surface temperature, 4x downscaling (see DATA.md).

One job: load the benchmark exactly as DATA.md defines it.

* Source: ``iris_sample_data/sample_data/GloSea4/ensemble_0NN.pp`` (package ``iris-sample-data``,
  Open Government Licence), read with ``scitools-iris``: 13 ensemble members (``006`` is absent) x 6
  monthly means (2011-08 .. 2012-01) of ``surface_temperature`` (K) on the UM N96 grid, 145 x 192.
* High-res truth: cropped to 144 x 192 by dropping the North Pole row (latitude -90 .. 88.75, ascending;
  longitude 0 .. 358.125, periodic).
* Low-res input: 4 x 4 block mean, 36 x 48 (:func:`dpdm_diffusers.data.coarsen`).
* Splits by month: train = 2011-08 .. 2011-11 (52 fields), validation = 2011-12 (13), test = 2012-01 (13).
* Static fields: topography and land fraction on the 144 x 192 grid (:func:`get_static_fields`).

Data are returned as ``xr.Dataset`` with dims ``(realization, time, lat, lon)``: ``realization`` (CF
standard name) is the GloSea4 ensemble member, numbered by its file (0..13 without 6), and ``time`` the
middle of each monthly mean. The name is not ``member``, the pipeline's ensemble dim, so the benchmark goes
into the pipeline as it is. Training code flattens ``realization x time`` into samples
(:func:`dpdm_diffusers.samples.normalize_fields` does).

Run ``python -m dpdm_diffusers.glosea4`` to print the benchmark summary and the Lerp (bilinear)
RMSE of the test month, globally and in the report regions.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import xarray as xr

from .data import PairedData, coarsen, regrid, select_box, select_time
from .grids import Grid

__all__ = [
    "NAME",
    "VARIABLE",
    "SCALE_FACTOR",
    "SPLITS",
    "REGIONS",
    "glosea4_dir",
    "load_glosea4",
    "GloSea4Benchmark",
    "load_glosea4_benchmark",
    "save_glosea4_netcdf",
    "lerp_rmse",
]

NAME = "glosea4-ts-x4"
VARIABLE = "surface_temperature"
SCALE_FACTOR = 4
SPLITS = {
    "train": ("2011-08", "2011-11"),
    "validation": ("2011-12", "2011-12"),
    "test": ("2012-01", "2012-01"),
}
# Report regions of DATA.md as ``select_box`` arguments: lat (south, north), lon (west, east).
REGIONS = {
    "global": None,
    "east_asia": {"lat": (10.0, 55.0), "lon": (100.0, 150.0)},
    "gulf_coast": {"lat": (20.0, 35.0), "lon": (-100.0, -80.0)},
    "northern_australia": {"lat": (-20.0, -10.0), "lon": (120.0, 150.0)},
}
_EXTRA = "pip install 'dpdm-diffusers[data]'"


def glosea4_dir() -> Path:
    """Folder of the GloSea4 ``.pp`` files inside the installed ``iris-sample-data`` package."""
    try:
        import iris_sample_data
    except ImportError as err:
        raise ImportError(f"The GloSea4 benchmark needs `iris-sample-data`; install the data extra: {_EXTRA}") from err
    path = Path(iris_sample_data.__file__).parent / "sample_data" / "GloSea4"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found; reinstall iris-sample-data ({_EXTRA}).")
    return path


@lru_cache(maxsize=2)
def _read_members(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Raw arrays (members, times, lat, lon, values, attrs) read once per process with iris."""
    try:
        import iris
    except ImportError as err:
        raise ImportError(f"Reading GloSea4 needs `scitools-iris`; install the data extra: {_EXTRA}") from err
    files = sorted(Path(path).glob("ensemble_*.pp"))
    if not files:
        raise FileNotFoundError(f"No ensemble_*.pp files in {path}.")
    members, values, times, lat, lon, attrs = [], [], None, None, None, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iris date-precision FutureWarnings
        for f in files:
            cube = iris.load_cube(str(f), VARIABLE)
            cube = cube.copy()
            t = cube.coord("time")
            tt = np.array([np.datetime64(d, "s") for d in t.units.num2pydate(t.points)])
            if times is None:
                times, attrs = tt, {"units": str(cube.units), "source": str(cube.attributes.get("source", ""))}
                lat = np.asarray(cube.coord("latitude").points, dtype=np.float64)
                lon = np.asarray(cube.coord("longitude").points, dtype=np.float64)
            elif not np.array_equal(tt, times):
                raise ValueError(f"{f.name} has different time steps from the other members.")
            dims = [c.name() for c in cube.dim_coords]
            if dims != ["time", "latitude", "longitude"]:
                raise ValueError(f"Unexpected dimensions {dims} in {f.name}.")
            data = cube.data
            values.append(np.ma.filled(np.ma.asarray(data, dtype=np.float32), np.nan))
            members.append(int(re.search(r"(\d+)", f.stem).group(1)))
    out = (np.array(members), times, lat, lon, np.stack(values), attrs)
    for a in out[:5]:
        a.flags.writeable = False
    return out


def load_glosea4(path: str | os.PathLike | None = None) -> xr.Dataset:
    """All 13 x 6 GloSea4 fields on the native 145 x 192 grid, dims ``(realization, time, lat, lon)``, in K."""
    path = Path(path) if path is not None else glosea4_dir()
    members, times, lat, lon, values, attrs = _read_members(str(path))
    da = xr.DataArray(
        np.array(values),  # a writable copy of the cached arrays
        dims=("realization", "time", "lat", "lon"),
        coords={
            "realization": ("realization", members.copy(),
                            {"standard_name": "realization", "long_name": "GloSea4 ensemble member (file number)"}),
            "time": ("time", times.astype("datetime64[ns]"), {"long_name": "middle of the monthly mean"}),
            "lat": ("lat", lat.copy(), {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": ("lon", lon.copy(), {"units": "degrees_east", "standard_name": "longitude"}),
        },
        attrs={"units": attrs["units"], "standard_name": VARIABLE, "long_name": "surface temperature (monthly mean)"},
    )
    return xr.Dataset({VARIABLE: da}, attrs={"source": f"GloSea4 via iris-sample-data; {attrs['source']}"})


@dataclass
class GloSea4Benchmark(PairedData):
    """The ``glosea4-ts-x4`` benchmark: truth, low-res input and static fields, with month splits.

    A :class:`~dpdm_diffusers.data.PairedData` (``high_res`` 144 x 192 and ``low_res`` 36 x 48 hold all
    six months) plus ``static`` (``None`` when loaded with ``static=False``); :meth:`split` selects one
    split from both and :meth:`split_lerp` interpolates a split's low-res (``lerp()`` covers all months).
    """

    static: xr.Dataset | None = None
    name: str = NAME

    def split(self, name: str) -> tuple[xr.Dataset, xr.Dataset]:
        """``(high_res, low_res)`` of ``"train"``, ``"validation"`` or ``"test"``."""
        if name not in SPLITS:
            raise KeyError(f"Unknown split {name!r}; expected one of {tuple(SPLITS)}.")
        return select_time(self.high_res, SPLITS[name]), select_time(self.low_res, SPLITS[name])

    def split_lerp(self, split: str, method: str = "bilinear") -> xr.Dataset:
        """Low-res of ``split`` interpolated to the 144 x 192 grid with :func:`grids.interpolate`."""
        return regrid(self.split(split)[1], self.grid, method=method)


NETCDF_ENV = "DPDM_GLOSEA4_NETCDF"


def save_glosea4_netcdf(path: str | os.PathLike) -> Path:
    """Write the benchmark (144 x 192 truth of all six months and its static fields) to one netCDF file.

    The copy is for machines without iris, pvlib or the mask package (e.g. a GPU node): point
    :func:`load_glosea4_benchmark` (``path=``) or the environment variable ``DPDM_GLOSEA4_NETCDF`` at it.
    Loading it gives the same arrays as the packaged source (tested)."""
    bench = load_glosea4_benchmark(static=True)
    ds = bench.high_res.copy()
    for name, da in bench.static.data_vars.items():
        ds[name] = da.assign_coords(lat=ds["lat"], lon=ds["lon"])
    ds.attrs.update({"dpdm_benchmark": NAME, "comment": "high-res truth; the low-res input is its 4 x 4 block mean"})
    path = Path(path)
    ds.to_netcdf(path, engine="h5netcdf")
    return path


def _benchmark_from_netcdf(path: Path, static: bool) -> GloSea4Benchmark:
    with xr.open_dataset(path, engine="h5netcdf") as f:
        ds = f.load()
    if ds.attrs.get("dpdm_benchmark") != NAME or VARIABLE not in ds:
        raise ValueError(f"{path} is not a {NAME} copy written by save_glosea4_netcdf.")
    if "member" in ds.dims:  # a copy written before the ensemble dim was named `realization`
        ds = ds.rename(member="realization")
    high = ds[[VARIABLE]]
    high.attrs = {k: v for k, v in ds.attrs.items() if k == "source"}
    static_ds = None
    if static:
        names = [n for n in ("topography", "land_sea_mask") if n in ds]
        if len(names) < 2:
            raise ValueError(f"{path} holds no static fields; write it with save_glosea4_netcdf.")
        static_ds = ds[names]
    return GloSea4Benchmark(high_res=high, low_res=coarsen(high, SCALE_FACTOR), scale_factor=SCALE_FACTOR,
                            static=static_ds)


def load_glosea4_benchmark(path: str | os.PathLike | None = None, *, static: bool = True) -> GloSea4Benchmark:
    """Build ``glosea4-ts-x4`` (see the module docstring); ``static=False`` skips the static fields.

    ``path`` (or ``$DPDM_GLOSEA4_NETCDF``) may name a netCDF copy from :func:`save_glosea4_netcdf`
    instead of the folder of ``.pp`` files."""
    path = path if path is not None else os.environ.get(NETCDF_ENV) or None
    if path is not None and Path(path).is_file():
        return _benchmark_from_netcdf(Path(path), static)
    full = load_glosea4(path)
    lat = full["lat"].values
    if lat.size != 145 or not np.isclose(lat[-1], 90.0):
        raise ValueError(f"Expected 145 latitudes ending at 90N, got {lat.size} ending at {lat[-1]}.")
    high = full.isel(lat=slice(0, 144))  # drop the North Pole row: 144 = 4 x 36
    low = coarsen(high, SCALE_FACTOR)
    static_ds = None
    if static:
        from .static_fields import get_static_fields

        static_ds = get_static_fields(Grid.from_xarray(high))
    return GloSea4Benchmark(high_res=high, low_res=low, scale_factor=SCALE_FACTOR, static=static_ds)


def lerp_rmse(truth: xr.Dataset, lerp: xr.Dataset, region: str = "global", *, weighted: bool = False) -> float:
    """RMSE of ``lerp`` against ``truth`` over all fields and grid points of a :data:`REGIONS` box.

    ``weighted=True`` weights grid points by ``cos(latitude)`` (area); the default pools points equally.
    """
    box = REGIONS[region]
    err = (lerp[VARIABLE] - truth[VARIABLE]) ** 2
    if box is not None:
        err = select_box(err, **box)
    if weighted:
        w = np.cos(np.deg2rad(err["lat"]))
        return float(np.sqrt(err.weighted(w).mean()))
    return float(np.sqrt(err.mean()))


def _main() -> None:
    import time

    t0 = time.perf_counter()
    bench = load_glosea4_benchmark(static=False)
    print(f"{NAME}: high-res {dict(bench.high_res.sizes)}, low-res {dict(bench.low_res.sizes)}, "
          f"loaded in {time.perf_counter() - t0:.1f} s")
    for name in SPLITS:
        h, _ = bench.split(name)
        print(f"  {name:<10} {h.sizes['realization'] * h.sizes['time']:>3} fields "
              f"({', '.join(np.datetime_as_string(h['time'].values, unit='M'))})")
    truth, _ = bench.split("test")
    lerp = bench.split_lerp("test", "bilinear").compute()
    print("\nLerp (bilinear, 36x48 block mean -> 144x192) RMSE on the test month 2012-01, K:")
    print(f"  {'region':<20}{'unweighted':>12}{'cos(lat)':>12}{'points':>8}")
    for region in REGIONS:
        n = truth[VARIABLE].isel(realization=0, time=0)
        n = n if REGIONS[region] is None else select_box(n, **REGIONS[region])
        print(f"  {region:<20}{lerp_rmse(truth, lerp, region):>12.3f}"
              f"{lerp_rmse(truth, lerp, region, weighted=True):>12.3f}{n.size:>8}")
    std = float(truth[VARIABLE].std())
    print(f"  global unweighted RMSE / std of the test truth ({std:.2f} K): {lerp_rmse(truth, lerp) / std:.3f}")


if __name__ == "__main__":
    _main()
