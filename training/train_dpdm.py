#!/usr/bin/env python
# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""Train or fine-tune a DPDM downscaling model with Accelerate (in the style of diffusers' examples).

    accelerate launch -m dpdm_diffusers.training.train_dpdm --config training/configs/glosea4_ts_x4.yaml
    accelerate launch -m dpdm_diffusers.training.train_dpdm --config my_region.yaml --init_from path/or/hub-id
    torchrun --nproc_per_node 2 -m dpdm_diffusers.training.train_dpdm --config ...   # 2 CPU processes (gloo)

Every option of the YAML config can be overridden on the command line (``--max_train_steps 500``).
The run leaves a ``DownscalingPipeline.save_pretrained`` folder in ``output_dir`` (EMA weights, model
card) and ``checkpoint-N`` folders that ``--resume_from_checkpoint latest`` continues from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dpdm_diffusers.training.card import training_card
from dpdm_diffusers.training.checkpoints import (
    NoiseRNG,
    prepare_output_dir,
    register_checkpoint_hooks,
    resume,
    save_checkpoint,
)
from dpdm_diffusers.training.config import TrainingConfig, parse_args, resolve_options
from dpdm_diffusers.training.data import load_training_data, training_batches
from dpdm_diffusers.training.stages import (
    build_pipeline,
    calibrate,
    finetune_two_stage,
    load_base_models,
    measure_noise_time_correlation,
    regression_forward,
    residual_scale,
)
from dpdm_diffusers.training.utils import Throughput, ema_weights, make_optimizer, tracker
from dpdm_diffusers.training.validation import validate

logger = logging.getLogger("dpdm_diffusers.training")


def train(cfg: TrainingConfig, base_kind: str | None = None) -> Path:
    """One training run (one UNet) with an already resolved config.

    Args:
        cfg: The config after :func:`~dpdm_diffusers.training.config.resolve_options`.
        base_kind: The base model's kind (``"two-stage"``, ``"diffusion"``, ``"regression"`` or ``None``).

    Returns:
        ``cfg.output_dir``: the trained pipeline, or only checkpoints when stopped early (``stop_after_steps``).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from dpdm_diffusers.device_patches import DevicePatchSampler, fits_on_device
    from dpdm_diffusers.modeling import build_unet, default_scheduler

    t_start = time.time()
    output_dir = Path(cfg.output_dir)
    log_with = tracker(cfg.report_to)
    accelerator = Accelerator(
        # torchrun/accelerate launch on a machine without a GPU: join the gloo process group (MULTI_CPU) instead of
        # each rank training alone
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info("state: %s", accelerator.state)
    set_seed(cfg.seed, device_specific=True)  # different crops on every process
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, cfg)

    # 1. Base model (fine-tuning), frozen regression mean (two-stage) and data
    base, reg = load_base_models(cfg)
    reg_unet = reg.unet if reg is not None else (base.regression_unet if base is not None else None)
    stats_from = reg if reg is not None else base  # the diffusion stage lives in the regression model's space
    data = load_training_data(cfg, stats_from)
    stats, dataset = data.stats, data.dataset
    stochastic_std = None
    if reg_unet is not None:  # two-stage: the diffusion UNet learns the regression residual / stochastic_std
        reg_unet.requires_grad_(False).eval().to(accelerator.device)
        stochastic_std = residual_scale(cfg, base, reg_unet, dataset, accelerator.device)
        stochastic_scale = torch.tensor(stochastic_std, device=accelerator.device).view(1, -1, 1, 1)
        if cfg.spread_factor != 1.0:  # the sampling scale only: the UNet still learns residuals of unit scale
            stochastic_std = [s * cfg.spread_factor for s in stochastic_std]
            logger.info("spread factor %s: members are sampled with stochastic_std %s", cfg.spread_factor,
                        stochastic_std)

    # 2. Model, EMA, optimiser, learning-rate schedule and patches
    if base is not None:
        unet = base.unet
    else:
        unet = build_unet(len(stats["variables"]), len(stats["static_channels"]), cfg.patch_size, cfg.unet_preset)
    unet.train()
    noise_scheduler = default_scheduler()
    ema = None
    if cfg.use_ema:
        # foreach: one fused update of all parameters instead of a kernel per tensor (hundreds of launches a step)
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=cfg.ema_warmup, inv_gamma=1.0,
                       power=3 / 4, foreach=True, model_cls=UNet2DModel, model_config=unet.config)
    # diffusion noise and timesteps have their own stream, saved in checkpoints (see NoiseRNG)
    noise_rng = NoiseRNG(cfg.seed * 1000 + accelerator.process_index, accelerator.device)
    register_checkpoint_hooks(accelerator, ema, noise_rng)

    optimizer = make_optimizer(unet.parameters(), cfg.learning_rate, cfg.adam_weight_decay, accelerator.device)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size, shuffle=False,
                                             num_workers=cfg.dataloader_num_workers, drop_last=True)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    on_device = cfg.patches_on_device
    if on_device is None:
        on_device = fits_on_device(data.fields, accelerator.device)
    sampler = None
    if on_device:
        sampler = DevicePatchSampler(dataset, cfg.train_batch_size, accelerator.device, accelerator.process_index)
    logger.info("patches cut %s", f"on {accelerator.device} (fields held there)" if sampler else
                f"by a DataLoader ({cfg.dataloader_num_workers} workers)")

    # 3. Resume
    global_step = resume(accelerator, cfg.resume_from_checkpoint, output_dir)
    if accelerator.is_main_process and log_with:
        accelerator.init_trackers("dpdm", config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})

    def run_validation(step) -> dict:
        if data.validation is None:
            return {}
        with ema_weights(accelerator.unwrap_model(unet), ema) as model:
            pipe = build_pipeline(model, cfg, stats, reg_unet, stochastic_std)
            metrics = validate(pipe, data.validation, cfg, seed=cfg.seed)
        logger.info("step %d validation: %s", step, metrics)
        accelerator.log(metrics, step=step)
        history["validation"].append({"step": step, **metrics})
        return metrics

    # 4. Train
    stop_at = cfg.max_train_steps
    if cfg.stop_after_steps is not None:
        stop_at = min(cfg.max_train_steps, global_step + cfg.stop_after_steps)
    progress = tqdm(range(cfg.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="train")
    batches = training_batches(accelerator, dataloader, dataset, sampler, global_step,
                               cfg.gradient_accumulation_steps)
    throughput = Throughput(accelerator.device, global_step)
    last_val, first_crops = {}, None
    # the curves of this process's steps (a resumed run has those after the resume point): training_summary.json
    history: dict[str, list] = {"loss": [], "validation": []}
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
    for batch in batches if global_step < stop_at else ():
        with accelerator.accumulate(unet):
            target, cond, mask = batch["target"], batch["condition"], batch["mask"].float()
            if reg_unet is not None:  # two-stage: learn what the frozen regression mean misses
                with torch.no_grad():
                    mean = regression_forward(reg_unet, target, cond)
                target = (target - mean.to(target.dtype)) / stochastic_scale
            if cfg.objective == "diffusion":
                gen = noise_rng.generator
                noise = torch.randn(target.shape, generator=gen, device=gen.device).to(target.device, target.dtype)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (target.shape[0],), generator=gen,
                                  device=gen.device).to(target.device)
                noisy = noise_scheduler.add_noise(target, noise, t)
                pred = unet(torch.cat([noisy, cond], dim=1), t).sample
                goal = noise
            else:  # deterministic baseline: zero noise, t = 0, predict the target itself
                pred = regression_forward(unet, target, cond)
                goal = target
            # L2 over the masked-in points only: missing values, padding and a validation box never count
            loss = (F.mse_loss(pred.float(), goal.float(), reduction="none") * mask).sum() / mask.sum().clamp_min(1)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        throughput.add(target.shape[0] * accelerator.num_processes)
        loss_sum += loss.detach()
        loss_count += 1
        if first_crops is None:  # which crops each process drew first: distinct data per process
            crops = torch.stack([torch.as_tensor(batch[k]) for k in ("sample", "y", "x")], dim=1)
            first_crops = accelerator.gather(crops.to(accelerator.device))
            first_crops = first_crops.view(accelerator.num_processes, -1, 3).tolist()
        if not accelerator.sync_gradients:
            continue
        if ema is not None:
            ema.step(unet.parameters())
        global_step += 1
        progress.update(1)
        throughput.step(global_step)
        if global_step % cfg.logging_steps == 0 or global_step >= stop_at:
            # reading the loss waits for the device, so it is read every logging_steps steps, not every step
            logs = {"loss": float(loss_sum) / loss_count, "lr": lr_scheduler.get_last_lr()[0]}
            loss_sum.zero_()
            loss_count = 0
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            history["loss"].append({"step": global_step, **logs})
        if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit)
        if cfg.validation_steps and global_step % cfg.validation_steps == 0 and accelerator.is_main_process:
            last_val = run_validation(global_step)
        if global_step >= stop_at:
            break
    samples_per_s, steady_samples_per_s = throughput.rates()
    progress.close()

    # 5. Save the final pipeline (EMA weights) with its model card; stopped early: a checkpoint to resume from
    accelerator.wait_for_everyone()
    from accelerate.utils import gather_object

    from dpdm_diffusers.run_store import module_digest

    # every process's weights: identical when gradients were synchronised (recorded, and tested)
    weights_per_process = gather_object([module_digest(accelerator.unwrap_model(unet))])
    if global_step < cfg.max_train_steps:
        if not (cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0):
            save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit)
        logger.info("stopped at step %d of %d; continue with --resume_from_checkpoint latest", global_step,
                    cfg.max_train_steps)
        accelerator.end_training()
        return output_dir
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(model.parameters())
        pipe = build_pipeline(model, cfg, stats, reg_unet, stochastic_std)
        wall = time.time() - t_start

        def card(validation: dict, calibration: dict | None) -> str:
            return training_card(cfg, pipe, data_info=data.region.describe, fields=data.fields,
                                 global_step=global_step, num_processes=accelerator.num_processes, wall=wall,
                                 validation=validation, calibration=calibration, stochastic_std=stochastic_std,
                                 base=base)

        # the trained model is saved before anything that could still fail (validation, calibration, upload)
        pipe.model_card = card({}, None)
        pipe.save_pretrained(output_dir)
        if not last_val:
            last_val = run_validation(global_step)
        persistence = measure_noise_time_correlation(pipe, data.region) if reg_unet is not None else None
        calibration = None
        has_validation = data.region.has_validation
        if reg_unet is not None and has_validation and cfg.calibrate_spread in (None, True):
            calibration = calibrate(pipe, data.region, cfg)
            stochastic_std = calibration["stochastic_std"]
        pipe.model_card = card(last_val, calibration)
        pipe.save_pretrained(output_dir)
        (output_dir / "training_summary.json").write_text(json.dumps(
            {"global_step": global_step, "train_samples_per_s": samples_per_s,
             "steady_train_samples_per_s": steady_samples_per_s, "wall_time_s": time.time() - t_start,
             "num_processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
             "weights_per_process": weights_per_process, "first_crops_per_process": first_crops,
             "stochastic_std": stochastic_std, "noise_time_persistence": persistence,
             "spread_calibration": {k: v for k, v in calibration.items() if k != "curve"} if calibration else None,
             **last_val, "history": history}, indent=2))
        if cfg.push_to_hub:
            pipe.push_to_hub(cfg.hub_model_id)
    accelerator.wait_for_everyone()  # the ranks leave the process group together (gloo could hang otherwise)
    accelerator.end_training()
    return output_dir


def run(cfg: TrainingConfig) -> Path:
    """Check a config, then train; a two-stage ``init_from`` model is fine-tuned as one
    (:func:`~dpdm_diffusers.training.stages.finetune_two_stage`).

    Args:
        cfg: A config from :func:`~dpdm_diffusers.training.config.parse_args` or built directly.

    Returns:
        The output folder.

    Raises:
        SystemExit: Inconsistent options (before anything is written).
    """
    cfg, kind = resolve_options(cfg)
    if (kind == "two-stage" or cfg.two_stage) and cfg.objective == "diffusion" and not cfg.regression_model:
        return finetune_two_stage(cfg, train)
    return train(cfg, kind)


def main(argv=None) -> Path:
    """The training script: :func:`run` on the options of ``argv`` (YAML ``--config`` and overrides)."""
    return run(parse_args(argv, description=__doc__))


if __name__ == "__main__":
    main()
