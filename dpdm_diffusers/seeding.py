"""Ensemble noise as a pure function of (seed, member, sample key).

A member's noise for one sample is seeded by the member's seed and the sample's *key* (its coordinate values, e.g. the
time stamp), never its position in a call: a member of a given time step is the same field whatever batch, chunk,
process, tiling or resumed run produced it. The pipeline, long reconstructions and resume all use these helpers.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import numpy as np
import torch


def _key_text(value) -> str:
    """A coordinate value as stable text: ISO time for datetime64/cftime, repr for numbers, str otherwise."""
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value, unit="s"))
    if hasattr(value, "isoformat"):  # cftime, datetime, pandas Timestamp
        return value.isoformat()
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def sample_keys(ds, batch_dims: Sequence[str]) -> list[str]:
    """One key per sample (C order over ``batch_dims``): ``"time=2016-01-16T12:00:00|realization=3"``. A dim without
    coordinate values is keyed by position (``"#0"``), as the batch axis of an array input is."""
    per_dim = []
    for d in batch_dims:
        if d in ds.coords:
            per_dim.append([f"{d}={_key_text(v)}" for v in ds[d].values])
        else:  # no coordinate values: keyed by position, like the batch axis of an array input
            per_dim.append([f"#{i}" for i in range(ds.sizes[d])])
    keys = ["|".join(combo) for combo in itertools.product(*per_dim)] if per_dim else [""]
    if len(set(keys)) != len(keys):  # two fields with one stamp would share their noise: refused, never silent
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise ValueError(f"Two samples share the coordinates {dup!r}: each sample's noise is keyed by its coordinates, "
                         "so they would get identical perturbations. Drop or relabel the duplicates.")
    return keys


def position_keys(batch: int) -> list[str]:
    """Keys of an array input's samples: arrays carry no coordinates, so samples are keyed by position."""
    return [f"#{b}" for b in range(batch)]


def noise_seed(member_seed: int, key: str) -> int:
    """The seed of one member's noise for one sample: a hash of (member seed, sample key), stable across runs,
    machines and Python versions (blake2b, not ``hash``)."""
    digest = hashlib.blake2b(f"{int(member_seed)}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63: a valid torch seed


def member_seeds(generator, num_members: int) -> list[int]:
    """One seed per member, drawn one at a time so member k never depends on ``num_members``."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != num_members:
            raise ValueError(f"Got {len(generator)} generators for {num_members} members; pass one or exactly num_members.")
        return [int(torch.randint(0, 2**62, (1,), generator=g).item()) for g in generator]
    return [int(torch.randint(0, 2**62, (1,), generator=generator).item()) for _ in range(num_members)]


def row_generators(seeds: Sequence[int], keys: Sequence[str]) -> list[torch.Generator]:
    """One generator per (member, sample) row, member-major (row = k * B + b)."""
    return [torch.Generator().manual_seed(noise_seed(s, key)) for s in seeds for key in keys]


# ---------------------------------------------------------------------------------------------------
# Noise correlated in time (per call, or the persistence a model measured in training): a member keeps part of
# its fine-scale anomaly from one time step to the next
# ---------------------------------------------------------------------------------------------------
TIME_UNITS = ("year", "month", "day")
MAX_TIME_CORRELATION = 0.95  # the truncated sum below needs ~90 draws per sample at 0.95


def time_index(value, unit: str) -> int:
    """A time stamp as a whole number of ``unit`` (year, month or day) steps, in the value's own calendar
    (cftime 360-day and noleap calendars count their own days), so that consecutive steps differ by 1."""
    if unit not in TIME_UNITS:
        raise ValueError(f"noise_time_unit must be one of {TIME_UNITS}, got {unit!r}.")
    if isinstance(value, np.datetime64):
        import pandas as pd

        value = pd.Timestamp(value)
    if unit == "year":
        return int(value.year)
    if unit == "month":
        return int(value.year) * 12 + int(value.month) - 1
    if hasattr(value, "calendar") and value.calendar:  # cftime: days in its calendar
        import cftime

        return int(np.floor(cftime.date2num(value, "days since 1800-01-01", calendar=value.calendar)))
    return int(value.toordinal())


def infer_time_unit(times) -> str:
    """The unit of a regular time axis: year, month or day, from the spacing of its first two stamps."""
    values = list(np.asarray(times).ravel())
    if len(values) < 2:
        raise ValueError("One time step cannot tell the time unit of correlated noise; pass noise_time_unit "
                         "(year, month or day).")
    for unit in TIME_UNITS:
        if time_index(values[1], unit) - time_index(values[0], unit) == 1:
            return unit
    raise ValueError(f"The time axis steps from {values[0]} to {values[1]}, not one year, month or day; pass "
                     "noise_time_unit for correlated noise.")


def time_correlated_noise(seeds: Sequence[int], samples: Sequence[tuple[str, int]], shape: tuple[int, ...],
                          rho: float) -> torch.Tensor:
    """Unit Gaussian noise, rows member-major, whose value for time index ``t`` is an AR(1) series in ``t`` with
    lag-1 correlation ``rho``, written as the sum (truncated where ``rho**j < 0.01`` and rescaled to unit variance)::

        z_t = sqrt(1 - rho^2) * sum_j rho^j e_{t-j}

    of innovations ``e_s`` that are pure functions of (member seed, the sample's other key, ``s``): each sample's
    noise needs no other sample, so chunking, resume and batching stay exact. ``samples``: per sample, its key
    without the time part and its :func:`time_index`."""
    if not 0.0 <= rho <= MAX_TIME_CORRELATION:
        raise ValueError(f"noise_time_correlation must be in [0, {MAX_TIME_CORRELATION}], got {rho}.")
    terms = 1 if rho == 0 else int(np.ceil(np.log(0.01) / np.log(rho)))
    weights = np.sqrt(1 - rho**2) * rho ** np.arange(terms)
    weights /= np.sqrt((weights**2).sum())
    rows = []
    for s in seeds:
        for other, t in samples:
            z = torch.zeros(shape)
            for j, w in enumerate(weights):
                g = torch.Generator().manual_seed(noise_seed(s, f"{other}|innovation={t - j}"))
                z += float(w) * torch.randn(shape, generator=g)
            rows.append(z[None])
    return torch.cat(rows)


def temporal_samples(ds, batch_dims: Sequence[str], time_dim: str, unit: str) -> list[tuple[str, int]]:
    """Per sample (C order over ``batch_dims``): its key without ``time_dim`` and its time index."""
    if time_dim not in batch_dims or time_dim not in ds.coords:
        raise ValueError(f"Noise correlated in time needs a {time_dim!r} coordinate among the batch dims "
                         f"{tuple(batch_dims)}.")
    out = []
    for combo in itertools.product(*[range(ds.sizes[d]) for d in batch_dims]):
        where = dict(zip(batch_dims, combo))
        other = "|".join(f"{d}={_key_text(ds[d].values[i])}" if d in ds.coords else f"#{i}"
                         for d, i in where.items() if d != time_dim)
        out.append((other, time_index(ds[time_dim].values[where[time_dim]], unit)))
    return out
