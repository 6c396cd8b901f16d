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
    return ["|".join(combo) for combo in itertools.product(*per_dim)] if per_dim else [""]


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
