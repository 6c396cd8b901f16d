"""The five-variable benchmark: an ECMWF TIGGE forecast's Eastern Hemisphere, split in space.

One job: the data of ``benchmarks/tigge_five_variables.py`` and of the five-variable default model, and the split
they keep to. The field is one time step (2007-05-05 00Z +120 h, 0.45 deg N200 Gaussian latitudes, 0-179.55E, 400 x
400; ``../shared/data/tigge_ecmwf_0p45_20070510_east.nc``, see DATA.md), so the split is spatial:

* **training**: the columns 0-108E (Africa, Europe, western and central Asia, the Indian Ocean), all latitudes,
  minus the validation box;
* **validation** (scores during training, spread calibration): 40S-40N x 60-100E, left out of the training loss;
* **test**: 45S-60N x 112-178E (East Asia, the Maritime Continent, Australia, the western Pacific), which training
  never sees, not even as input (it lies outside the training columns).

The input is the 4 x 4 block mean (1.8 deg) of the regularised field, as the paper makes its low-res side.

Rebuilding the file: ``pip download pygrib==2.1.8 --no-binary :all:``, open ``sampledata/ecmwf_tigge.grb`` in the
sdist with cfgrib (``xr.open_dataset(path, engine="cfgrib")``, needs ecCodes), keep ``longitude < 180`` and write
netCDF: the names and units are those GRIB decoding gives (``2t`` in K, ``tp`` in ``kg m**-2`` over the 120 h).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import xarray as xr

__all__ = ["DATA_ENV", "SAMPLE_FILE", "SCALE_FACTOR", "TEST_BOX", "TRAIN_LON", "VALIDATION_BOX", "VARIABLES",
           "TiggeTest", "find_data", "load_test_sample", "load_tigge", "test_split", "training_options",
           "write_test_sample"]

VARIABLES = ["2t", "10u", "10v", "sp", "tp"]
UNITS = {"tp": "mm"}  # GRIB's kg m**-2 of water is a depth in mm (converted with pint, through water's density)
SCALE_FACTOR = 4
TRAIN_LON = (0.0, 108.0)
VALIDATION_BOX = ((-40.0, 40.0), (60.0, 100.0))  # (lat, lon)
TEST_BOX = ((-45.0, 60.0), (112.0, 178.0))
DATA_ENV = "DPDM_TIGGE_FILE"
FILE_NAME = "tigge_ecmwf_0p45_20070510_east.nc"
SAMPLE_FILE = "test_box.nc"  # the test box's truth and static fields, shipped with the five-variable model


def find_data(path: str | os.PathLike | None = None) -> Path:
    """The TIGGE file: ``path``, else ``$DPDM_TIGGE_FILE``, else ``shared/data/`` beside or above the checkout."""
    candidates = [Path(path)] if path else []
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    root = Path(__file__).resolve().parents[1]
    candidates += [root / "shared" / "data" / FILE_NAME, root.parent / "shared" / "data" / FILE_NAME]
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError(f"The TIGGE five-variable file was not found (looked in {[str(c) for c in candidates]}); "
                            f"set {DATA_ENV} or pass its path. dpdm_diffusers.tigge's docstring says how to rebuild it.")


def load_tigge(path: str | os.PathLike | None = None) -> tuple[xr.Dataset, xr.Dataset]:
    """``(high_res, static)``: the five variables (``tp`` in mm) and ``topography``/``land_sea_mask`` from the
    file's own ``orog``/``lsm``, on the regularised 0.45 deg grid, in memory."""
    from . import data
    from .static_fields import get_static_fields
    from .user_data import declare_units

    f = find_data(path)
    ds = data.open_dataset(f, regular_grid=True)
    hr = declare_units(ds[VARIABLES], UNITS, VARIABLES).load()
    static = get_static_fields(hr, ["topography", "land_sea_mask"], sources={"topography": f, "land_sea_mask": f},
                               rename={"orog": "topography", "lsm": "land_sea_mask"}, regular_grid=True)
    return hr, static


@dataclass
class TiggeTest:
    """The test box: coarse input, fine truth and static fields, aligned to whole coarse cells."""

    low_res: xr.Dataset
    truth: xr.Dataset
    static: xr.Dataset


def test_split(path: str | os.PathLike | None = None, box=TEST_BOX) -> TiggeTest:
    """The test box's 4 x 4 block-mean input, its truth and static fields (the input sees nothing outside it)."""
    from . import data
    from .user_data import box_indices

    hr, static = load_tigge(path)
    pairs = data.make_pairs(hr, scale_factor=SCALE_FACTOR)
    ys, xs = box_indices(pairs.grid, SCALE_FACTOR, *box)
    s = SCALE_FACTOR
    low = pairs.low_res.isel(lat=slice(ys.start // s, ys.stop // s), lon=slice(xs.start // s, xs.stop // s)).load()
    return TiggeTest(low, hr.isel(lat=ys, lon=xs), static.isel(lat=ys, lon=xs))


def training_options(path: str | os.PathLike | None = None, variables=VARIABLES) -> dict:
    """The training options (:class:`~dpdm_diffusers.training.config.TrainingConfig` fields) that read the file as a
    user would (``regular_grid``, ``units``, the static fields from the file) and keep to the split."""
    f = str(find_data(path))
    return dict(
        dataset="files", high_res=[f], variables=list(variables), units={v: u for v, u in UNITS.items()
                                                                           if v in variables},
        regular_grid=True, lon_box=list(TRAIN_LON), validation_lat_box=list(VALIDATION_BOX[0]),
        validation_lon_box=list(VALIDATION_BOX[1]), static_files={"topography": f, "land_sea_mask": f},
        static_map={"orog": "topography", "lsm": "land_sea_mask"}, scale_factor=SCALE_FACTOR,
    )


def write_test_sample(test: TiggeTest, path: str | os.PathLike) -> Path:
    """The test box's truth and static fields as one small netCDF (the input is their block mean, so it is not
    stored): what the five-variable model ships so that ``dpdm demo`` runs without the TIGGE file."""
    from .io import netcdf_encoding

    ds = xr.merge([test.truth, test.static])
    ds.attrs = {"title": "TIGGE five-variable benchmark, test box (truth at 0.45 deg and static fields)",
                "source": "ECMWF TIGGE control forecast 2007-05-05 00Z +120 h (pygrib 2.1.8 sdist "
                          "sampledata/ecmwf_tigge.grb); see dpdm_diffusers/tigge.py",
                "dpdm_test_box": str(TEST_BOX), "Conventions": "CF-1.8"}
    path = Path(path)
    ds.to_netcdf(path, encoding=netcdf_encoding(ds, chunked=False))
    return path


def load_test_sample(path: str | os.PathLike) -> TiggeTest:
    """A :func:`write_test_sample` file as a :class:`TiggeTest` (input = the truth's 4 x 4 block mean)."""
    from . import data

    ds = xr.load_dataset(path)
    truth = ds[[v for v in VARIABLES if v in ds.data_vars]]
    pairs = data.make_pairs(truth, scale_factor=SCALE_FACTOR)
    return TiggeTest(pairs.low_res.load(), truth, ds[["topography", "land_sea_mask"]])
