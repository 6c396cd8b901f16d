"""Physical units: parse, compare and convert with pint and cf-xarray's CF unit registry.

One job: make ``"K"``, ``"kelvin"`` and ``"degK"`` the same unit, turn ``degC`` into ``K`` or ``hPa`` into
``Pa`` (offsets and factors done by pint, not by hand), and refuse a missing or incompatible ``units``
attribute with a message that names the variable, what it has and what is expected.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["parse_units", "same_units", "compatible_units", "convert_units", "require_units", "unit_factor"]


@lru_cache(maxsize=1)
def _registry():
    # cf-xarray's registry reads CF/UDUNITS spellings ("m s-1", "degC", "degrees_north", "1", "%"); building it
    # redefines a few pint units, which pint logs as warnings: not the user's concern
    import logging

    pint_log = logging.getLogger("pint.util")
    level = pint_log.level
    pint_log.setLevel(logging.ERROR)
    try:
        from cf_xarray.units import units
    finally:
        pint_log.setLevel(level)

    return units


@lru_cache(maxsize=256)
def parse_units(text: str):
    """A pint ``Unit`` for a CF/UDUNITS unit string; ``ValueError`` for one pint cannot read."""
    reg = _registry()
    spelled = str(text).strip()
    aliases = {"": "1", "fraction": "1", "0-1": "1", "(0-1)": "1", "deg_c": "degC", "celsius": "degC", "deg_k": "K"}
    spelled = aliases.get(spelled.lower(), spelled)
    # "deg K", "degrees Celsius", "degree_F": pint reads "deg"/"degree" as an angle times the temperature unit
    # (0.0175 K), so temperature spellings are matched whole first
    match = _TEMPERATURE.fullmatch(spelled.lower())
    if match:
        spelled = {"k": "K", "kelvin": "K", "c": "degC", "celsius": "degC", "centigrade": "degC", "f": "degF",
                   "fahrenheit": "degF"}[match.group(1) or match.group(2)]
    try:
        unit = reg.Unit(spelled)
    except Exception as err:  # pint raises several error types for unreadable strings
        raise ValueError(f"Cannot read the unit {text!r} (expected a CF/UDUNITS unit such as 'K', 'degC', 'm s-1', 'Pa').") from err
    if unit.dimensionality == reg.Unit("K").dimensionality and unit not in _temperatures(reg):
        raise ValueError(f"Cannot read the unit {text!r} as a temperature unambiguously (pint reads it as {unit}); "
                         "write 'K', 'degC' or 'degF'.")
    return unit


# "deg K", "degrees_C", "degree Fahrenheit", "celsius" (a bare "C" or "F" stays pint's coulomb or farad)
_TEMPERATURE = __import__("re").compile(r"deg(?:ree)?s?[ _]?(k|kelvin|c|celsius|centigrade|f|fahrenheit)|"
                                        r"(kelvin|celsius|centigrade|fahrenheit)")


@lru_cache(maxsize=1)
def _temperatures(reg):
    return {reg.Unit(u) for u in ("K", "degC", "degF", "degR")}


def same_units(a: str, b: str) -> bool:
    """Whether two spellings name the same unit (``"K"`` / ``"kelvin"``, ``"m/s"`` / ``"m s-1"``)."""
    try:
        ua, ub = parse_units(a), parse_units(b)
    except ValueError:
        return str(a).strip() == str(b).strip()
    if ua == ub:
        return True
    # a conversion factor of 1 without offset (kg m-2 of water and mm too)
    try:
        scale, offset = unit_factor(a, b)
    except ValueError:
        return False
    return bool(np.isclose(scale, 1.0) and np.isclose(offset, 0.0, atol=1e-12))


def _water_factor(a: str, b: str) -> float | None:
    """The power of liquid water's density (1000 kg m-3) that turns ``a`` into ``b``'s dimensionality: precipitation
    as a mass per area (``kg m-2``, GRIB's tp) and as a depth (``mm``, ``m``), or their rates (``kg m-2 s-1`` and
    ``mm/day``); ``None`` when no such power exists."""
    try:
        ua, ub = parse_units(a), parse_units(b)
    except ValueError:
        return None
    density = _registry().Unit("kg m-3")
    for power in (1, -1):
        if (ua / density**power).dimensionality == ub.dimensionality:
            return power
    return None


def compatible_units(a: str, b: str) -> bool:
    """Whether values in ``a`` can be converted to ``b``: the same dimensionality (``degC`` and ``K``), or
    precipitation as mass per area and as depth (``kg m-2`` and ``mm``), through the density of liquid water."""
    try:
        if parse_units(a).dimensionality == parse_units(b).dimensionality:
            return True
    except ValueError:
        return False
    return _water_factor(a, b) is not None


def unit_factor(have: str, target: str) -> tuple[float, float]:
    """``(scale, offset)`` with ``value_in_target = value * scale + offset`` (pint; water density for mass per area
    <-> depth). ``ValueError`` when the units cannot be converted; an accumulation (``mm``) and a rate (``mm/day``)
    cannot, since that needs the accumulation period: divide by it yourself and set the new units."""
    q, ua, ub = _registry().Quantity, parse_units(have), parse_units(target)
    if ua.dimensionality != ub.dimensionality:
        power = _water_factor(have, target)
        if power is None:
            hint = ""
            as_rate = [f"({target}) s", f"({have}) s"]
            if any(_water_factor(*pair) is not None or parse_units(pair[0]).dimensionality == parse_units(pair[1])
                   .dimensionality for pair in ((have, as_rate[0]), (as_rate[1], target))):
                hint = (" One is an accumulation and the other a rate: divide the accumulation by its period (e.g. "
                        "24 h for a daily total) and set the rate's units.")
            raise ValueError(f"{have!r} cannot be converted to {target!r}.{hint}")
        ua = ua / _registry().Unit("kg m-3") ** power
        scale = q(1000.0**-power, ua).to(ub).magnitude
        return float(scale), 0.0
    offset = q(0.0, ua).to(ub).magnitude
    return float(q(1.0, ua).to(ub).magnitude - offset), float(offset)


def require_units(obj, name: str, expected: str | None = None) -> str:
    """The ``units`` attribute of ``obj`` (an xarray object); a clear error when it is missing or empty."""
    have = obj.attrs.get("units")
    if have is None or str(have).strip() == "":
        want = f" (this model expects {expected!r})" if expected else ""
        raise ValueError(
            f"Variable {name!r} has no `units` attribute{want}. Set it, e.g. "
            f"`ds[{name!r}].attrs['units'] = {expected or 'K'!r}`, so values are never misread."
        )
    return str(have)


def convert_units(da, target: str, name: str | None = None):
    """Return ``da`` (xarray) in ``target`` units, converting compatible units (``degC`` -> ``K``, ``hPa`` -> ``Pa``).

    A missing ``units`` attribute or incompatible units raise ``ValueError``; the same unit in another
    spelling only relabels the attribute. Lazy (dask) data stays lazy.
    """
    name = name or str(da.name)
    have = require_units(da, name, target)
    if same_units(have, target):
        return da.assign_attrs(units=target) if have != target else da
    try:
        scale, offset = unit_factor(have, target)
    except ValueError as err:
        raise ValueError(f"Variable {name!r} is in {have!r}, which cannot be converted to {target!r} (the model's "
                         f"units): {err}") from None
    out = da * scale + offset if offset else da * scale
    return out.astype(da.dtype if np.issubdtype(da.dtype, np.floating) else np.float32).assign_attrs({**da.attrs, "units": target})
