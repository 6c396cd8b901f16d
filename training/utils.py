# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""Small pieces of a training loop: optimiser, device synchronisation, EMA weights, throughput, trackers."""

from __future__ import annotations

import contextlib
import time

import torch

__all__ = ["Throughput", "ema_weights", "make_optimizer", "synchronize", "tracker"]


def make_optimizer(params, lr: float, weight_decay: float, device) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel on CUDA (the benchmarks' bare loop uses the same call)."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def synchronize(device) -> None:
    """Wait for queued GPU work, so that wall-clock rates count what was computed, not what was queued."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def tracker(report_to: str) -> str | None:
    """Accelerate's ``log_with`` for ``report_to``: ``"tensorboard"`` only when it is installed, else ``None``."""
    if report_to != "tensorboard":
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    return "tensorboard"


@contextlib.contextmanager
def ema_weights(model, ema):
    """Evaluate ``model`` with the EMA weights (when ``ema`` is not ``None``) and in eval mode; both are undone on
    exit, also after an error."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    try:
        yield model
    finally:
        model.train()
        if ema is not None:
            ema.restore(model.parameters())


class Throughput:
    """Training samples per second, overall and in the steady state.

    The steady state starts ``warmup_steps`` steps after ``start_step`` (after cuDNN's autotuning and the
    allocator's first growth).

    Args:
        device: The training device (its queued work is waited for before reading the clock).
        start_step: The global step this invocation starts at.
        warmup_steps: Steps left out of the steady-state rate.
    """

    def __init__(self, device, start_step: int, warmup_steps: int = 10):
        self.device, self.start_step, self.warmup_steps = device, start_step, warmup_steps
        self.samples, self.steady_from = 0, None
        self.t_start = self.t_steady = time.time()

    def add(self, samples: int) -> None:
        """Count the samples of one micro-step (all processes)."""
        self.samples += samples

    def step(self, global_step: int) -> None:
        """Mark an optimiser step: the steady state starts at ``start_step + warmup_steps``."""
        if self.steady_from is None and global_step - self.start_step == self.warmup_steps:
            synchronize(self.device)
            self.t_steady, self.steady_from = time.time(), self.samples

    def rates(self) -> tuple[float, float]:
        """``(overall, steady)`` samples per second so far (steady = overall when the run was too short)."""
        synchronize(self.device)
        now = time.time()
        overall = self.samples / max(now - self.t_start, 1e-9)
        if self.steady_from is None or self.samples == self.steady_from:
            return overall, overall
        return overall, (self.samples - self.steady_from) / max(now - self.t_steady, 1e-9)
