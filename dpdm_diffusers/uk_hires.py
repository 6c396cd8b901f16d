"""The UK 1.5 km rotated-pole sample (iris-sample-data ``uk_hires.pp``) as CF netCDF files.

One job: turn the Met Office UM field file into what a user of a regional model has: a rotated-pole netCDF of the
field and one of its orography. Source: ``uk_hires.pp`` (package ``iris-sample-data``, Open Government Licence), read
with ``scitools-iris`` and written with iris's own CF writer (``rotated_latitude_longitude`` grid mapping, pole
37.5N 177.5E):

* ``theta.nc``: ``air_potential_temperature`` (K), 3 hourly times (2009-11-19 10-12 UTC) x 7 model levels
  (1, 4, ... 19) x 204 x 187 cells of 0.0135 rotated degrees (1.5 km), over the Irish Sea, Wales and north-west
  England (52.6-55.4N, 6.9-2.5W). The hybrid-height coordinate is dropped (the levels stay as model level numbers).
* ``orography.nc``: ``surface_altitude`` (m) on the same grid.

Run ``python -m dpdm_diffusers.uk_hires OUT_DIR`` to write both.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

__all__ = ["save_uk_hires"]


def save_uk_hires(out_dir) -> dict[str, Path]:
    """Write ``theta.nc`` and ``orography.nc`` (see the module docstring) into ``out_dir``; returns their paths."""
    try:
        import iris
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError("The UK sample needs scitools-iris and iris-sample-data: pip install 'dpdm-diffusers[data]'") from err

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = iris.sample_data_path("uk_hires.pp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # iris's load-time notices about PP header fields
        theta = iris.load_cube(source, "air_potential_temperature")
        orography = iris.load_cube(source, "surface_altitude")
        for factory in list(theta.aux_factories):
            theta.remove_aux_factory(factory)
        for coord in list(theta.aux_coords):
            if coord.ndim > 1 or coord.name() in ("level_height", "sigma", "surface_altitude"):
                theta.remove_coord(coord)
        paths = {"theta": out / "theta.nc", "orography": out / "orography.nc"}
        iris.save(theta, str(paths["theta"]))
        iris.save(orography, str(paths["orography"]))
    return paths


if __name__ == "__main__":  # pragma: no cover - a command
    for name, path in save_uk_hires(sys.argv[1] if len(sys.argv) > 1 else ".").items():
        print(f"wrote {path} ({name})")
