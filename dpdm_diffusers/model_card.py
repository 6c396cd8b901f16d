"""Hub model cards for DownscalingPipeline folders.

A card is YAML front matter (read by the Hub: library, tags, licence, datasets, base model) plus
Markdown sections. Training fills in data, procedure and metrics; a bare pipeline still gets a card
that says what the model expects (variables, units, grids, static fields).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

DEFAULT_TAGS = ["diffusers", "climate", "downscaling", "super-resolution", "dpdm", "xarray"]


def _config_table(config: Mapping[str, Any], pipe=None) -> str:
    rows = [
        ("variables", ", ".join(f"{v} [{u}] ({t})" for v, u, t in zip(config["variables"], config["units"], config["transforms"]))),
        ("static channels", ", ".join(config.get("static_channels") or []) or "none"),
        ("scale factor", f"x{config['scale_factor']}"),
        ("patch size", f"{config['patch_size']} px"),
        ("prediction target", config["prediction"]),
        ("low-res interpolation", config["interpolation"]),
        ("objective", config.get("objective", "diffusion")),
    ]
    std = config.get("stochastic_std")
    if std and any(abs(x - 1.0) > 1e-12 for x in std):  # two-stage pipelines carry a regression_unet
        rows.append(("two-stage", "regression UNet mean + residual diffusion (CorrDiff); stochastic std "
                     + ", ".join(f"{x:.3f}" for x in std)))
    if pipe is not None:
        from .modeling import describe_unet

        for name in ("unet", "regression_unet"):
            unet = getattr(pipe, name, None)
            if unet is not None:
                rows.append((name, describe_unet(unet)))
    return "\n".join(["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PLACEHOLDER_ID = "path/to/this/folder"


def base_model_reference(path_or_id: str, base=None) -> tuple[str | None, str]:
    """``(hub_id, text)`` naming a base model in a card: its Hub id when it has one (recorded in the base
    folder's ``model_index.json`` as ``hub_id`` by ``push_to_hub``, or given as an id), never a local path."""
    hub_id = (base.config.get("hub_id") if base is not None else None) or None
    if hub_id is None and path_or_id and not os.path.exists(path_or_id) and _HUB_ID.fullmatch(str(path_or_id)):
        hub_id = str(path_or_id)
    if hub_id:
        return hub_id, f"[`{hub_id}`](https://huggingface.co/{hub_id})"
    name = os.path.basename(os.path.normpath(str(path_or_id)))
    return None, f"the local model `{name}` (no Hub id recorded; a model gets one when it is pushed with `push_to_hub`)"


def model_index(model_name: str, scores: Mapping[str, float], dataset_name: str = "validation split",
                dataset_type: str = "custom", dataset_split: str = "validation") -> list[dict]:
    """``model-index`` front matter (the Hub's evaluation-results format) for ``scores`` (metric name -> value),
    built by huggingface_hub's ``EvalResult``/``ModelCardData`` so the Hub parses it. Metric names such as
    ``"RMSE 10-member mean (K)"`` are kept as names; their type is the part before the first space, lower-cased."""
    from huggingface_hub import EvalResult, ModelCardData

    results = [EvalResult(task_type="image-to-image", task_name="Downscaling", dataset_type=dataset_type,
                          dataset_name=dataset_name, dataset_split=dataset_split, metric_type=name.split()[0].lower(),
                          metric_name=name, metric_value=round(float(value), 4))
               for name, value in scores.items() if value == value]  # NaN scores are left out
    if not results:
        return []
    return ModelCardData(model_name=model_name, eval_results=results).to_dict()["model-index"]


def set_model_index(card: str, model_name: str, scores: Mapping[str, float], **dataset: str) -> str:
    """``card`` with its front matter's ``model-index`` replaced by ``scores`` (see :func:`model_index`)."""
    if not card.startswith("---\n"):
        raise ValueError("The card has no YAML front matter.")
    head, body = card[4:].split("\n---\n", 1)
    meta = yaml.safe_load(head) or {}
    meta["model-index"] = model_index(model_name, scores, **dataset)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False).strip() + "\n---\n" + body


def render_model_card(
    config: Mapping[str, Any],
    *,
    title: str = "DPDM downscaling model",
    summary: str = "",
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    base_model: str | None = None,
    base_text: str | None = None,
    sections: Mapping[str, str] | None = None,
    repo_id: str | None = None,
    pipe=None,
    eval_results: Mapping[str, float] | None = None,
    eval_dataset: Mapping[str, str] | None = None,
) -> str:
    """Render a model card (Markdown with Hub front matter) for a pipeline ``config``.

    ``base_model`` (a Hub id) goes into the front matter; ``base_text`` says what the base is in words.
    With ``pipe`` the card lists the UNets' architecture as read off the weights. ``eval_results`` (metric name ->
    value) become the front matter's ``model-index``, which the Hub shows as the model's scores.
    """
    meta: dict[str, Any] = {"library_name": "diffusers", "license": license, "tags": list(DEFAULT_TAGS)}
    if datasets:
        meta["datasets"] = list(datasets)
    if base_model:
        meta["base_model"] = base_model
    meta["pipeline_tag"] = "image-to-image"
    if eval_results:
        meta["model-index"] = model_index(title, eval_results, **(eval_dataset or {}))
    load_id = repo_id or config.get("hub_id") or PLACEHOLDER_ID
    usage = f"""```python
import torch
from dpdm_diffusers import DownscalingPipeline

pipe = DownscalingPipeline.from_pretrained("{load_id}")
out = pipe(low_res,                      # xr.Dataset with {list(config['variables'])} in {list(config['units'])}
           num_members=10, num_inference_steps=20,
           generator=torch.Generator().manual_seed(0))
out.mean, out.std, out.members           # xarray on the x{config['scale_factor']} grid
```

diffusers' generic entry point loads it too; the folder's `pipeline_downscaling.py` only imports the installed
package's class, hence `trust_remote_code=True`:

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{load_id}", trust_remote_code=True)
```"""
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False).strip() + "\n---",
        f"# {title}",
        summary.strip(),
        "## How to use\n\nInstall `dpdm-diffusers` (`pip install dpdm-diffusers`), then:\n\n" + usage,
        "## Model\n\nA conditional diffusion model (DPDM, Ling et al. 2024, doi:10.1038/s41612-024-00679-1) as a "
        "diffusers `DownscalingPipeline`: `UNet2DModel` + scheduler, weights in safetensors.\n\n" + _config_table(config, pipe),
    ]
    if base_model or base_text:
        parts.append(f"## Base model\n\nFine-tuned from {base_text or f'`{base_model}`'}.")
    sections = dict(sections or {})
    sections.setdefault("Uses", uses_text(config))
    sections.setdefault("Limitations", LIMITATIONS)
    sections.setdefault("Citation", CITATION)
    for heading, body in sections.items():
        parts.append(f"## {heading}\n\n{body.strip()}")
    return "\n\n".join(p for p in parts if p) + "\n"


def uses_text(config: Mapping) -> str:
    """The Hub card's "Uses": what the model is for and what it is not for, from its config."""
    variables = ", ".join(f"{v} ({u})" for v, u in zip(config["variables"], config["units"]))
    what = ("deterministic downscaling (one field: the conditional mean, smoother than the truth; a baseline and the "
            "first stage of two-stage models)" if config.get("objective") == "regression" else
            "probabilistic downscaling (an ensemble of fine fields: the members for uncertainty, extremes and "
            "spread, the ensemble mean as a best estimate)")
    return (f"**Direct use**: {what} of {variables} by {config['scale_factor']}x, from coarse fields like the ones "
            "it was trained on. Regular latitude/longitude grids in any convention; `dpdm downscale` streams long "
            "records.\n\n"
            "**Out of scope**: other variables, units or scale factors (refused); inputs far outside the training "
            "climate (values more than 10 training standard deviations away are refused, but a shifted climate "
            "inside that range is not detected: check with `dpdm evaluate`); rotated-pole or curvilinear grids "
            "(regrid first); using one member as if it were the truth.")


LIMITATIONS = ("A diffusion model's members are only as good as its training data and region: scores elsewhere are "
               "not known until measured (`dpdm evaluate` on held-out files). The spread is calibrated for one "
               "sampler and step count; another sampler or step count changes it (README: samplers). The ensemble "
               "mean is smoother than any member; do not read its variance as the climate's.")

CITATION = """The method (cite the paper, and this software by its repository):

```bibtex
@article{ling2024dpdm,
  title   = {Diffusion model-based probabilistic downscaling for 180-year East Asian climate reconstruction},
  author  = {Ling, Fenghua and others},
  journal = {npj Climate and Atmospheric Science},
  year    = {2024},
  doi     = {10.1038/s41612-024-00679-1}
}
```"""
