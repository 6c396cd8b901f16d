# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""Checkpoints of a training run: written atomically, resumed exactly, never a pickle that could run code.

A ``checkpoint-N`` folder holds Accelerate's state (model, optimiser, LR schedule, data position, RNGs), the EMA
weights (``unet_ema``) and a safetensors noise-RNG file per process. It counts only once its
:data:`COMPLETE_MARKER` is written, so a run killed mid-save never leaves a checkpoint that resumes wrongly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
import yaml

__all__ = [
    "COMPLETE_MARKER",
    "NoiseRNG",
    "check_checkpoint_readable",
    "list_checkpoints",
    "prepare_output_dir",
    "register_checkpoint_hooks",
    "resume",
    "save_checkpoint",
]

logger = logging.getLogger("dpdm_diffusers.training")

COMPLETE_MARKER = "checkpoint_complete.json"


class NoiseRNG:
    """A dedicated generator for diffusion noise and timesteps, saved in every checkpoint.

    The global torch RNG is also consumed by DataLoader iterators (created at different points in a fresh and a
    resumed run), so a resumed run only repeats an uninterrupted one with its own stream. Its state is a
    safetensors file per process, never a pickle: Accelerate's ``register_for_checkpointing`` would unpickle it
    with ``weights_only=False``, so a shared checkpoint could run code on resume.

    Args:
        seed: Seed of this process's stream.
        device: Where the noise is drawn.
    """

    def __init__(self, seed: int, device):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @staticmethod
    def path(folder, process_index: int) -> Path:
        return Path(folder) / f"noise_rng_{process_index}.safetensors"

    def save(self, folder, process_index: int) -> None:
        from safetensors.torch import save_file

        save_file({"state": self.generator.get_state()}, str(self.path(folder, process_index)))

    def load(self, folder, process_index: int) -> None:
        from safetensors.torch import load_file

        path = self.path(folder, process_index)
        try:
            state = load_file(str(path))["state"]
            self.generator.set_state(state.cpu())
        except Exception as err:  # missing or corrupt: a resume without it would silently differ
            raise ValueError(f"Cannot restore the noise RNG from {path} ({err}); the checkpoint is incomplete.") \
                from err


def check_checkpoint_readable(path: Path, process_index: int) -> None:
    """Fail (never skip) when a checkpoint's random states cannot be read safely.

    Accelerate would log the problem and go on, and the resumed run would silently stop repeating an
    uninterrupted one. Loaded with ``weights_only=True``: a pickle that carries code is refused here, not executed.

    Raises:
        ValueError: The random-state file of this process is missing, corrupt or unsafe, or a UNet config is out of
            bounds (a tampered checkpoint would otherwise hang the resume building a huge network).
    """
    from accelerate.utils import load

    from dpdm_diffusers.pipelines.hub_mixin import check_unet_folder

    for name in ("unet", "unet_ema"):  # the bounds every loader of the project applies, before diffusers builds it
        check_unet_folder(path / name, name)
    rng = path / f"random_states_{process_index}.pkl"
    try:
        load(rng)
    except Exception as err:
        raise ValueError(f"Checkpoint {path} has an unreadable or unsafe {rng.name} ({type(err).__name__}: {err}).") \
            from err


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete ``checkpoint-N`` folders as ``(N, path)``, oldest first. Half-written ones (no marker) never count."""
    out = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / COMPLETE_MARKER).exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def prepare_output_dir(output_dir: Path, cfg) -> None:
    """Create the run's folder, remove the temporary checkpoints of a killed run, write the config it runs with."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for partial in output_dir.glob(".checkpoint-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    (output_dir / "training_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None) -> None:
    """Write ``checkpoint-N`` atomically: save to a temporary folder, mark it complete, then rename.

    Args:
        accelerator: The run's ``Accelerator`` (every process calls this).
        output_dir: The run's folder.
        step: The global step (the ``N`` of the folder name).
        limit: How many complete checkpoints to keep (the oldest are removed); ``None`` keeps all.
    """
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if limit is not None:
            for _, old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


def register_checkpoint_hooks(accelerator, ema, noise_rng: NoiseRNG) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` write and read the UNet as a diffusers folder, the EMA
    weights and the noise RNG (safetensors all)."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    def save_model_hook(models, weights, out):
        noise_rng.save(out, accelerator.process_index)  # every process: its own noise stream
        if accelerator.is_main_process:
            if ema is not None:
                ema.save_pretrained(os.path.join(out, "unet_ema"))
            for m in models:
                accelerator.unwrap_model(m).save_pretrained(os.path.join(out, "unet"))
                weights.pop()

    def load_model_hook(models, inp):
        noise_rng.load(inp, accelerator.process_index)
        if ema is not None:
            from diffusers.utils import logging as dlogging

            level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # EMA's own config keys are not UNet config: diffusers warns
            try:
                loaded = EMAModel.from_pretrained(os.path.join(inp, "unet_ema"), UNet2DModel)
            finally:
                dlogging.set_verbosity(level)
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
        for _ in range(len(models)):
            m = models.pop()
            loaded = UNet2DModel.from_pretrained(inp, subfolder="unet")
            m.register_to_config(**loaded.config)
            m.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def resume(accelerator, checkpoint: str | None, output_dir: Path) -> int:
    """Restore the state of ``checkpoint`` (a folder, or ``"latest"``) and return its global step.

    ``"latest"`` tries the complete checkpoints newest first and falls back, with a warning, past unreadable
    ones; with none at all the run starts at step 0.

    Raises:
        ValueError: A named checkpoint (or the last fallback) is incomplete, unreadable or unsafe.
    """
    if not checkpoint:
        return 0
    if checkpoint == "latest":
        candidates = [p for _, p in reversed(list_checkpoints(output_dir))]  # newest first
        if not candidates:
            logger.info("no complete checkpoint in %s: starting a new run", output_dir)
    else:
        path = Path(checkpoint)
        if not (path / COMPLETE_MARKER).exists():
            raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}).")
        candidates = [path]
    for k, path in enumerate(candidates):
        try:
            check_checkpoint_readable(path, accelerator.process_index)
            accelerator.load_state(str(path))
        except Exception as err:
            if k + 1 == len(candidates) or checkpoint != "latest":
                raise ValueError(f"Cannot resume from {path}: {err}") from err
            logger.warning("checkpoint %s is unreadable (%s); falling back to %s", path, err, candidates[k + 1])
            continue
        step = int(path.name.split("-")[1])
        logger.info("resumed from %s at step %d", path, step)
        return step
    return 0
