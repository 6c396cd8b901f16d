"""The unfinished store of a long reconstruction: who may write it, what run it belongs to, which chunks are whole.

One job: the bookkeeping that makes :func:`dpdm_diffusers.reconstruct.reconstruct` safe to kill, resume and share.

* **Fingerprints** (:func:`model_fingerprint`, :func:`InputFingerprint`): bitwise hashes of the weights, of the input
  values the model sees, of the input's coordinates and calendar and of the static fields. A resume is accepted only
  when they, and every setting that changes values, equal the unfinished run's; a model folder spelled another way
  (relative, absolute, a symlink) has the same weights and still resumes.
* **Chunk checksums**: a chunk is done when its marker exists *and* its data reads back with the checksum the marker
  holds. Damaged chunks (overwritten, deleted, truncated files) are found on resume and before the output is moved
  into place, and recomputed.
* **One writer per output** (:class:`OutputLock`): a lock file with the owner's host and process id, taken before
  anything is created and removed at the end; a lock whose process is gone (same host) is stale and taken over.
* **Write errors** (:func:`explain_store_error`): a full disk, a quota, a read-only or forbidden folder is one line
  naming the path, the bytes still to write and how to resume.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import xarray as xr

logger = logging.getLogger(__name__)

#: Settings recorded for the reader but not compared on resume: the same weights under another path still resume.
NOT_COMPARED = ("model",)
#: What each compared setting means, for the refusal message.
DESCRIPTIONS = {
    "model_fingerprint": "the model's weights or config",
    "input_values": "the input's values",
    "input_coords": "the input's coordinates or calendar",
    "static_fields": "the static fields (--static)",
    "dtype": "the UNet arithmetic (--dtype)",
    "conserve": "conservation (--conserve)",
    "variable_map": "the variable mapping (--variable)",
}
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------
def model_fingerprint(pipe) -> str:
    """A bitwise hash of the model: its config and the bytes of every tensor of its UNets (not sums, whose float
    rounding depends on the thread count)."""
    h = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in dict(pipe.config).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name in ("unet", "regression_unet"):
        unet = getattr(pipe, name, None)
        if unet is not None:
            h.update(f"{name}:{module_digest(unet)}".encode())
    return h.hexdigest()


def module_digest(module) -> str:
    """A hash of the names, shapes, dtypes and bytes of a module's tensors."""
    import torch

    module = getattr(module, "_orig_mod", module)  # torch.compile wraps the module; the weights are the same
    h = hashlib.blake2b(digest_size=16)
    for key, value in sorted(module.state_dict().items()):
        h.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return h.hexdigest()


def array_fingerprint(values) -> str:
    """A hash of an array's shape and float32 bytes (``None`` hashes as ``"none"``)."""
    if values is None:
        return "none"
    a = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
    return hashlib.blake2b(repr(a.shape).encode() + a.tobytes(), digest_size=16).hexdigest()


def coords_fingerprint(ds: xr.Dataset) -> str:
    """A hash of the input's lat/lon/time coordinate values, its calendar, its time units and its grid mapping: another
    region, other stamps or another calendar of the same shape differ."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(ds.coords):
        c = ds[name]
        if c.ndim > 1:
            continue
        h.update(name.encode())
        values = np.atleast_1d(c.values)
        h.update(np.asarray([str(v) for v in values]).astype("U").tobytes() if values.dtype.kind in "OMm"
                 else np.ascontiguousarray(values).tobytes())
        for key in ("calendar", "units"):
            h.update(str(c.encoding.get(key, c.attrs.get(key, ""))).encode())
        if "grid_mapping_name" in c.attrs:  # the same axes about another pole or origin are another place
            h.update(repr(sorted((k, str(v)) for k, v in c.attrs.items())).encode())
    return h.hexdigest()


class InputFingerprint:
    """The input's values hashed chunk by chunk, in the order of the record (the values the model sees: after the
    variable map, unit conversion and sorting, so a float64 copy of the same file resumes)."""

    def __init__(self):
        self._h = hashlib.blake2b(digest_size=16)

    def update(self, values: np.ndarray) -> None:
        self._h.update(np.ascontiguousarray(values, dtype=np.float32).tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def differences(old: dict, new: dict) -> list[str]:
    """The compared settings in which two runs differ."""
    return sorted(k for k in set(old) | set(new) if k not in NOT_COMPARED and old.get(k) != new.get(k))


def refusal(store: Path, diff: list[str]) -> str:
    what = ", ".join(DESCRIPTIONS.get(k, k) for k in diff)
    return (f"An unfinished run in {store} was made with other inputs or settings (they differ in {diff}: {what}); "
            "refusing to mix runs. Rerun with the same inputs and settings to finish it, or pass --overwrite "
            "(overwrite=True) to discard it and start over.")


# --------------------------------------------------------------------------------------------------
# Chunks: markers with checksums
# --------------------------------------------------------------------------------------------------
def markers_path(store: Path) -> Path:
    """Folder of the per-chunk "done" markers, beside the store (zarr readers warn about foreign files inside)."""
    return store.with_name(store.name[: -len(".zarr")] + ".chunks")


def marker(store: Path, i: int) -> Path:
    return markers_path(store) / f"chunk-{i:06d}.done"


def marked(store: Path, n_chunks: int) -> set[int]:
    """Chunks with a marker (not yet checked against their data)."""
    return {i for i in range(n_chunks) if marker(store, i).exists()}


def region_checksum(ds: xr.Dataset) -> str:
    """A hash of every data variable's float32 values, in name order (NaN bytes included: a missing chunk file,
    read back as the fill value, differs)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(ds.data_vars):
        h.update(name.encode())
        h.update(np.ascontiguousarray(ds[name].values, dtype=np.float32).tobytes())
    return h.hexdigest()


def read_region(store: Path, names: Iterable[str], a: int, b: int) -> xr.Dataset:
    with xr.open_zarr(store, consolidated=False) as ds:
        return ds[list(names)].isel(time=slice(a, b)).load()


def mark_done(store: Path, i: int, a: int, b: int, checksum: str) -> None:
    """Write chunk ``i``'s marker (atomically, after its data) with the checksum its data must read back with."""
    m = marker(store, i)
    tmp = m.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"chunk": i, "time": [a, b], "checksum": checksum}))
    os.replace(tmp, m)


def chunk_is_whole(store: Path, names: Iterable[str], i: int, a: int, b: int) -> bool:
    """Whether chunk ``i``'s marker exists and its data reads back with the marker's checksum."""
    try:
        expected = json.loads(marker(store, i).read_text())["checksum"]
        return region_checksum(read_region(store, names, a, b)) == expected
    except FileNotFoundError:
        return False
    except Exception as err:  # noqa: BLE001 - any failure to read the chunk back (decompression, truncation) = damaged
        logger.warning("chunk %d of %s cannot be read back (%s)", i, store, err)
        return False


def whole_chunks(store: Path, names: Iterable[str], chunks) -> set[int]:
    """The chunks that are done and whole; the markers of damaged ones are removed (so they are recomputed)."""
    names = list(names)
    done = marked(store, len(chunks))
    whole = set()
    for i, a, b in chunks:
        if i not in done:
            continue
        if chunk_is_whole(store, names, i, a, b):
            whole.add(i)
        else:
            logger.warning("chunk %d (time steps %d:%d) of %s is damaged: it will be recomputed", i, a, b, store)
            marker(store, i).unlink(missing_ok=True)
    return whole


# --------------------------------------------------------------------------------------------------
# One writer per output
# --------------------------------------------------------------------------------------------------
def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.dpdm-lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    return True


class OutputLock:
    """``with OutputLock(output):`` -- this process is the only ``dpdm`` run writing ``output`` meanwhile.

    The lock file (``.<name>.dpdm-lock``, created with ``O_EXCL``) holds the owner's host, process id and start
    time. Another live owner makes the second run fail at once with a message naming it; an owner that is gone
    (same host, process id no longer running) left a stale lock, which is taken over."""

    def __init__(self, output: Path):
        self.path = lock_path(Path(output))
        self.owned = False

    def __enter__(self) -> OutputLock:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner == {}:  # released meanwhile: try again
                    continue
                if owner and owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1))):
                    logger.warning("removing the stale lock %s of process %s, which is gone", self.path, owner.get("pid"))
                    self.path.unlink(missing_ok=True)
                    continue
                if owner is None:  # being written this instant, or unreadable: look again
                    time.sleep(0.2)
                    if self._owner() is None and self.path.exists():
                        raise FileExistsError(f"{self.path} exists but cannot be read; if no dpdm run is writing "
                                              f"{self.path.name[1:-len('.dpdm-lock')]}, delete it.") from None
                    continue
                raise FileExistsError(
                    f"Another dpdm run (process {owner.get('pid')} on {owner.get('host')}, since "
                    f"{owner.get('started')}) is writing {self.path.parent / self.path.name[1:-len('.dpdm-lock')]}. "
                    f"Wait for it to finish; if that process is gone, delete {self.path}.") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.owned = True
            return self
        raise FileExistsError(f"Could not take the lock {self.path}; delete it if no dpdm run is writing this output.")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            return None

    def __exit__(self, *exc) -> bool:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False
        return False


def discard(store: Path) -> None:
    """Delete an unfinished run's store and markers (``overwrite=True``)."""
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(markers_path(store), ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Write errors
# --------------------------------------------------------------------------------------------------
def is_write_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in WRITE_ERRNOS


def explain_store_error(err: OSError, store: Path, bytes_left: int, chunks_done: int, chunks_total: int) -> OSError:
    """One clear line for a write that failed while streaming: the path, the bytes still to write (uncompressed, an
    upper bound) and how to resume or clean up."""
    path = getattr(err, "filename", None) or store
    reason = {errno.ENOSPC: "No space left on the device", errno.EDQUOT: "Disk quota exceeded",
              errno.EFBIG: "File size limit reached", errno.EROFS: "Read-only file system",
              errno.EACCES: "Permission denied", errno.EPERM: "Operation not permitted"}.get(err.errno, str(err))
    try:
        free = f"{shutil.disk_usage(store.parent).free / 2**20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    resume = (f"{chunks_done} of {chunks_total} chunks are done and kept in {store}: fix this and rerun the same "
              f"command to resume, or delete that folder (or pass --overwrite) to start over")
    return OSError(err.errno, f"{reason} writing {path} ({free}; up to {bytes_left / 2**20:.0f} MB still to write). "
                              f"{resume}.", str(path))
