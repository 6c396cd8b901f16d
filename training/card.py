# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""The model card of a training run: lineage, data, procedure, architecture (read off the weights), scores."""

from __future__ import annotations

import dataclasses
import os
import sys

import yaml

__all__ = ["calibration_text", "card_scores", "training_card"]

CARD_SCORE_NAMES = {"val_rmse_mean": "RMSE ensemble mean", "val_rmse_member0": "RMSE one member",
                    "val_rmse_lerp": "RMSE interpolation"}


def training_card(cfg, pipe, *, data_info: dict, fields, global_step: int, num_processes: int, wall: float,
                  validation: dict, calibration: dict | None, stochastic_std, base=None) -> str:
    """Render the model card of a trained pipeline.

    Args:
        cfg: The resolved :class:`~dpdm_diffusers.training.config.TrainingConfig`.
        pipe: The trained ``DownscalingPipeline``.
        data_info: ``{label: text}`` lines describing the data and its splits.
        fields: The training fields (``NormalizedFields``): their grid and count are shown.
        global_step: Steps trained.
        num_processes: Processes of the run.
        wall: Wall time of this invocation in seconds.
        validation: Scores of :func:`~dpdm_diffusers.training.validation.validate` (may be empty).
        calibration: The spread calibration's result, or ``None``.
        stochastic_std: The two-stage sampling scale (ignored for one-stage models).
        base: The base pipeline when fine-tuning.

    Returns:
        The card as Markdown with a Hub front matter (``model-index`` carries the validation scores).
    """
    from dpdm_diffusers import __version__
    from dpdm_diffusers.io import portable_path
    from dpdm_diffusers.model_card import base_model_reference, render_model_card
    from dpdm_diffusers.modeling import describe_unet

    base_id, base_text = base_model_reference(cfg.init_from, base) if cfg.init_from else (None, None)
    two_stage = pipe.regression_unet is not None
    summary = (f"Trained with `dpdm_diffusers.training.train_dpdm` (dpdm-diffusers {__version__}), objective "
               f"`{cfg.objective}`"
               + (f", fine-tuned from {base_text}" if base_text else "")
               + (", two-stage: regression UNet mean + residual diffusion (stochastic_std "
                  + ", ".join(f"{x:.3f}" for x in stochastic_std) + ")" if two_stage else "") + ".")
    command = " ".join(str(portable_path(a)) if os.path.exists(a) else a for a in sys.argv)
    arch = [f"- {name}: {describe_unet(m)}"
            for name, m in (("unet", pipe.unet), ("regression_unet", pipe.regression_unet)) if m is not None]
    sections = {
        "Training data": "\n".join(f"- {k}: {portable_path(v)}" for k, v in data_info.items())
        + f"\n- high-res training grid: {fields.shape[0]} x {fields.shape[1]}, {fields.num_samples} training fields",
        "Training procedure": "\n".join([
            f"- steps: {global_step}, batch {cfg.train_batch_size} x {num_processes} processes "
            f"x {cfg.gradient_accumulation_steps} accumulation, patches {cfg.patch_size} px",
            *arch,
            f"- AdamW lr {cfg.learning_rate}, {cfg.lr_scheduler} schedule, EMA {cfg.use_ema} (decay {cfg.ema_decay})",
            f"- seed {cfg.seed}, mixed precision {cfg.mixed_precision}, wall time of this invocation "
            f"{wall / 60:.1f} min",
            f"- command: `{command}`",
            "- config:\n\n```yaml\n" + yaml.safe_dump(portable_path(dataclasses.asdict(cfg)), sort_keys=False) + "```",
        ]),
        "Validation": "\n".join(f"- {k}: {v:.4f}" for k, v in validation.items()) or "no validation scores yet",
    }
    if calibration:
        sections["Spread calibration"] = calibration_text(calibration)
    rho = float(pipe.config.get("noise_time_correlation", 0.0) or 0.0)
    if rho:
        sections["Persistence"] = (
            f"Each member's noise is correlated in time with lag-1 correlation {rho:.2f} per "
            f"{pipe.config.get('noise_time_unit')}: the persistence of the truth's fine-scale residual (truth minus "
            "the regression mean) on the training split, so members keep the truth's step-to-step persistence "
            "(benchmarks/results/climate_signal.md). Pass `noise_time_correlation=0` for independent time steps.")
    variables = ", ".join(map(str, pipe.config.variables))
    return render_model_card(dict(pipe.config), title=cfg.model_card_title, base_model=base_id, base_text=base_text,
                             repo_id=cfg.hub_model_id, summary=summary, sections=sections, pipe=pipe,
                             eval_results=card_scores(validation, calibration),
                             eval_dataset={"dataset_name": f"{variables} validation split",
                                           "dataset_type": "custom", "dataset_split": "validation"})


def calibration_text(calibration: dict) -> str:
    """The card's account of a spread calibration: the factor and scores of each variable, in its own units."""
    aim = "the lowest fair CRPS" if calibration.get("target") == "crps" else "a spread-skill ratio closest to 1"
    lines = [f"`stochastic_std` of each variable multiplied by the factor with {aim} on the validation split "
             f"({calibration['num_members']} members, {calibration['num_inference_steps']} steps):", ""]
    for v, r in (calibration.get("per_variable") or {}).items():
        lines.append(f"- {v}: factor {r['factor']:.3f}; CRPS {r['crps_uncalibrated']:.4g} -> {r['crps']:.4g} (its "
                     f"units); spread-skill {r['ssr_uncalibrated']:.2f} -> {r['ssr']:.2f}"
                     + (" **(at the edge of the search: not calibrated)**" if r.get("at_edge") else ""))
    return "\n".join(lines)


def card_scores(validation: dict, calibration: dict | None) -> dict:
    """The scores a card's ``model-index`` shows, named for a reader of the Hub page.

    One variable: its scores in its units. Several: each variable's scores in its own units (``RMSE ensemble mean
    (tp)``), never a pool of Pa, K and mm.
    """
    per_variable = [k.split("/", 1)[1] for k in validation if k.startswith("val_rmse_mean/")]
    if not per_variable:
        scores = {label: validation[k] for k, label in CARD_SCORE_NAMES.items() if k in validation}
    else:
        scores = {f"{label} ({v})": validation[f"{k}/{v}"] for v in per_variable
                  for k, label in CARD_SCORE_NAMES.items() if f"{k}/{v}" in validation}
    if calibration:
        rows = calibration.get("per_variable") or {}
        if len(rows) > 1:
            for v, r in rows.items():
                scores[f"CRPS ensemble ({v})"] = r["crps"]
                scores[f"SSR spread-skill ({v})"] = r["ssr"]
        else:
            scores["CRPS ensemble"] = calibration["crps"]
            scores["SSR spread-skill"] = calibration["ssr"]
    return scores
