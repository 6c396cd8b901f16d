"""Fast paths for inference: device, reduced precision, channels_last, torch.compile, threads, tiles per call.

One job: put a loaded pipeline in its fastest safe configuration for a device. Each option is measured
against the default in ``benchmarks/reconstruct.py`` with its effect on the ensemble mean.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "default_tiles_per_call", "apply_fast_paths"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_tiles_per_call(device) -> int:
    """Tiles per UNet call that suit the device: 16 on CPU (fastest in benchmarks/results/speed.md), 256 on a GPU
    (one H100 ran the shipped model 9x faster with 256 than with 16)."""
    return 256 if torch.device(device).type == "cuda" else 16


def apply_fast_paths(pipe, *, device="cpu", dtype: str = "fp32", channels_last: bool | None = None,
                     compile: bool = False, threads: int | None = None):
    """Move ``pipe`` to ``device`` and enable the chosen fast paths (returns ``pipe``).

    * ``dtype``: ``"bf16"``/``"fp16"`` run the UNets under ``torch.autocast`` (weights and the sampler's state
      stay float32, so only the network's arithmetic is reduced); ``fp16`` needs a GPU.
    * ``channels_last``: NHWC memory layout for the UNets' convolutions; default on (it never changes results
      beyond float rounding and was 1.0-2.1x on CPU).
    * ``compile``: ``torch.compile`` the UNets (opt-in: compiling costs a minute before the first call).
    * ``threads``: ``torch.set_num_threads`` for CPU inference.
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}.")
    device = torch.device(device)
    if dtype == "fp16" and device.type == "cpu":
        raise ValueError("fp16 inference needs a GPU (CPU kernels for half precision are slow or missing); use bf16 on CPU.")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}.")
        torch.set_num_threads(int(threads))
    pipe.to(device)
    pipe.autocast_dtype = None if dtype == "fp32" else DTYPES[dtype]
    channels_last = True if channels_last is None else channels_last
    for name in ("unet", "regression_unet"):
        unet = getattr(pipe, name, None)
        if unet is None:
            continue
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        if compile:
            pipe.register_modules(**{name: torch.compile(unet)})
    return pipe
