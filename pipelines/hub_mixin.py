# Copyright 2026 The dpdm-diffusers developers. Licensed under the Apache License, Version 2.0.
"""Loading, saving and sharing of DownscalingPipeline folders, with the safety rules that shared folders need.

- Weights load from safetensors only; no code from a folder is ever run (``trust_remote_code`` is refused: the class
  is resolved to the installed one by :class:`own_pipeline_class`).
- Configs read from shared folders are bounded (:data:`CONFIG_LIMITS`) and must carry the model's statistics
  (:data:`REQUIRED_CONFIG`), so a tampered folder is refused before anything is built.
- Every saved folder carries a model card and a one-line module stub, so diffusers' generic
  ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` finds the class too.
"""

from __future__ import annotations

import json
import os

# The module file every saved folder carries, so that diffusers' generic loader finds the class the way it finds any
# Hub pipeline (`_class_name: [module, class]` in model_index.json, loaded with trust_remote_code=True). It only
# re-exports the installed package's class: the "remote code" is one import line, and
# `DownscalingPipeline.from_pretrained` never runs it.
PIPELINE_MODULE = "pipeline_downscaling"
PIPELINE_MODULE_SOURCE = '''"""Loader stub for diffusers' generic entry point; the pipeline itself comes from the installed package.

    pip install dpdm-diffusers
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("<this folder or Hub id>", trust_remote_code=True)

`dpdm_diffusers.DownscalingPipeline.from_pretrained(...)` loads the same folder without running this file.
"""

from dpdm_diffusers.pipelines.pipeline_downscaling import DownscalingPipeline, DownscalingPipelineOutput  # noqa: F401
'''

# Bounds for configs read from shared folders: far above any real model, far below what would hang the loader or
# exhaust memory (a UNet at these limits has ~1e9 parameters).
CONFIG_LIMITS = {"layers_per_block": 8, "levels": 8, "channels": 2048, "in_out_channels": 512, "sample_size": 4096,
                 "patch_size": 4096, "scale_factor": 100, "variables": 64, "num_train_timesteps": 100_000}
MAX_CONFIG_BYTES = 1 << 20  # a real model_index.json or config.json is a few kB; a 200 MB one is an attack
REQUIRED_CONFIG = ("variables", "units", "transforms", "norm_mean", "norm_std", "residual_std", "static_channels",
                   "static_mean", "static_std", "scale_factor", "patch_size")

# The private diffusers function own_pipeline_class redirects (tests/test_pipeline.py fails loudly if it moves).
PATCHED_DIFFUSERS_FUNCTION = "diffusers.pipelines.pipeline_utils._get_pipeline_class"


def drop_source_paths(folder) -> None:
    """Remove ``_name_or_path`` (where a re-saved pipeline was loaded from: a machine path for local folders) from the
    saved configs, so a shared folder never records the machine it was made on."""
    for root, _, files in os.walk(folder):
        for name in files:
            if name not in ("model_index.json", "config.json"):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            if config.pop("_name_or_path", None) is not None:
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2, sort_keys=True)
                    f.write("\n")


def write_pipeline_module(folder) -> None:
    """Make a saved folder loadable by ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``: write
    the module stub and point ``model_index.json``'s ``_class_name`` at it."""
    with open(os.path.join(folder, f"{PIPELINE_MODULE}.py"), "w", encoding="utf-8") as f:
        f.write(PIPELINE_MODULE_SOURCE)
    path = os.path.join(folder, "model_index.json")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    index["_class_name"] = [PIPELINE_MODULE, "DownscalingPipeline"]
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


class own_pipeline_class:  # noqa: N801 - a context manager, used like a function
    """While loading through ``DownscalingPipeline.from_pretrained``, resolve the pipeline class to ``cls`` itself
    instead of importing the module named by ``_class_name`` (diffusers would otherwise ask for trust_remote_code).
    Only calls for ``cls`` are redirected; other pipelines loading meanwhile resolve as before."""

    def __init__(self, cls):
        self.cls = cls

    def __enter__(self):
        import diffusers
        import diffusers.pipelines.pipeline_utils as pipeline_utils

        if not callable(getattr(pipeline_utils, "_get_pipeline_class", None)):
            raise ImportError(
                f"diffusers {diffusers.__version__} no longer has {PATCHED_DIFFUSERS_FUNCTION}, which dpdm-diffusers "
                "redirects to load its folders without running their code; install a diffusers version within "
                "dpdm-diffusers' requirement (pip install 'dpdm-diffusers[...]' resolves it).")
        self.module, self.original = pipeline_utils, pipeline_utils._get_pipeline_class
        cls, original = self.cls, self.original

        def resolve(class_obj, *args, **kwargs):
            return class_obj if class_obj is cls else original(class_obj, *args, **kwargs)

        pipeline_utils._get_pipeline_class = resolve
        return self

    def __exit__(self, *exc):
        self.module._get_pipeline_class = self.original
        return False


def check_untrusted_config(pipeline_cls, path, kwargs) -> None:
    """Refuse, before anything is built, a folder whose configs lack statistics or ask for absurd sizes."""
    from diffusers import DDPMScheduler, UNet2DModel

    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    for sub, name in (("", "model_index.json"), ("unet", "config.json"), ("regression_unet", "config.json"),
                      ("scheduler", "scheduler_config.json")):
        check_config_size(_config_file(path, sub, name, hub))
    index = pipeline_cls.load_config(path, **hub)
    missing = [k for k in REQUIRED_CONFIG if k not in index]
    if missing:
        raise ValueError(f"{path} lacks {missing} in model_index.json: the model's statistics and layout are "
                         "required, never filled with defaults.")
    lim = CONFIG_LIMITS
    problems = []
    if not isinstance(index["variables"], list) or not 0 < len(index["variables"]) <= lim["variables"]:
        problems.append(f"variables {str(index['variables'])[:80]}")
    for key in ("patch_size", "scale_factor"):
        if not isinstance(index[key], int) or not 0 < index[key] <= lim[key]:
            problems.append(f"{key} {index[key]!r} (limit {lim[key]})")
    for name in ("unet", "regression_unet"):
        entry = index.get(name)
        if isinstance(entry, (list, tuple)) and entry and entry[0] is not None:
            problems += unet_config_problems(UNet2DModel.load_config(path, subfolder=name, **hub), name)
    sched = index.get("scheduler")
    if isinstance(sched, (list, tuple)) and sched and sched[0] is not None:
        t = DDPMScheduler.load_config(path, subfolder="scheduler", **hub).get("num_train_timesteps", 1000)
        if not isinstance(t, int) or not 0 < t <= lim["num_train_timesteps"]:
            problems.append(f"scheduler.num_train_timesteps {t!r} (limit {lim['num_train_timesteps']})")
    if problems:
        raise ValueError(f"Refusing {path}: its configs ask for sizes no downscaling model needs: {'; '.join(problems)}.")


def _config_file(path, subfolder: str, name: str, hub: dict) -> str | None:
    """The local file of one config of a folder or Hub id (``None`` when the model has no such file)."""
    if os.path.isdir(str(path)):
        local = os.path.join(str(path), subfolder, name)
        return local if os.path.isfile(local) else None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(str(path), name, subfolder=subfolder or None,
                               **{k: v for k, v in hub.items() if k != "local_files_only"})
    except Exception:  # not there (or offline): diffusers' own loader reports it
        return None


def check_config_size(file) -> None:
    """Refuse a config file larger than :data:`MAX_CONFIG_BYTES` before parsing it."""
    if file is not None and os.path.getsize(file) > MAX_CONFIG_BYTES:
        raise ValueError(f"Refusing {file}: {os.path.getsize(file) / 2**20:.0f} MB is not a model config (limit "
                         f"{MAX_CONFIG_BYTES // 2**20} MB).")


def check_unet_folder(folder, name: str = "unet") -> None:
    """Refuse a UNet folder (a training checkpoint's ``unet``/``unet_ema``) whose config is oversized, out of bounds
    or malformed, before diffusers builds the network."""
    file = os.path.join(str(folder), "config.json")
    check_config_size(file if os.path.isfile(file) else None)
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
        problems = unet_config_problems(config, name) if isinstance(config, dict) else [f"{name} config is not a mapping"]
        if problems:
            raise ValueError(f"Refusing {folder}: its config asks for sizes no downscaling model needs: "
                             f"{'; '.join(problems)}.")


def unet_config_problems(c: dict, name: str = "unet") -> list[str]:
    """What in a UNet config exceeds :data:`CONFIG_LIMITS` or is malformed (empty when it is within bounds)."""
    lim, problems = CONFIG_LIMITS, []
    chans = c.get("block_out_channels", [])
    if not isinstance(c.get("layers_per_block"), int) or not 0 < c["layers_per_block"] <= lim["layers_per_block"]:
        problems.append(f"{name}.layers_per_block {c.get('layers_per_block')!r} (limit {lim['layers_per_block']})")
    if (not isinstance(chans, (list, tuple)) or not 0 < len(chans) <= lim["levels"]
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= lim["channels"] for x in chans)):
        problems.append(f"{name}.block_out_channels {str(chans)[:80]} (a list of up to {lim['levels']} levels of up "
                        f"to {lim['channels']} channels)")
        chans = []
    groups = c.get("norm_num_groups", 32)
    if groups is not None and (not isinstance(groups, int) or groups < 1 or any(x % groups for x in chans)):
        problems.append(f"{name}.norm_num_groups {groups!r} (a positive integer dividing every block's channels)")
    for key in ("down_block_types", "up_block_types"):
        types = c.get(key)
        if types is not None and (not isinstance(types, (list, tuple)) or (chans and len(types) != len(chans))):
            problems.append(f"{name}.{key} {str(types)[:80]} (one per level of block_out_channels)")
    for key, limit in (("in_channels", lim["in_out_channels"]), ("out_channels", lim["in_out_channels"]),
                       ("sample_size", lim["sample_size"])):
        value = c.get(key)
        if value is not None and (not isinstance(value, int) or not 0 < value <= limit):
            problems.append(f"{name}.{key} {value!r} (limit {limit})")
    return problems


class DownscalingHubMixin:
    """``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` for :class:`DownscalingPipeline`, safetensors only,
    running no folder code, keeping the model card (``README.md``) and its lineage. Mixed in before
    ``DiffusionPipeline``, whose methods it wraps."""

    # kept for code that read the limits off the class
    CONFIG_LIMITS = CONFIG_LIMITS
    REQUIRED_CONFIG = REQUIRED_CONFIG

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved pipeline (folder or Hub id). Weights load from safetensors only; the folder's model
        card (``README.md``) is kept in ``pipe.model_card`` so that ``save_pretrained`` keeps the lineage.

        The folder's module stub (for ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)``) is never
        run here: this class is the class, so no remote code is needed or executed."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("dpdm-diffusers loads weights from safetensors only (use_safetensors=False is refused).")
        if kwargs.pop("trust_remote_code", False) or kwargs.get("custom_pipeline") is not None:
            raise ValueError("DownscalingPipeline.from_pretrained runs no code from the folder (trust_remote_code and "
                             "custom_pipeline are refused); it needs none.")
        kwargs["use_safetensors"] = True
        path = str(pretrained_model_name_or_path)
        looks_local = os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1  # ids: owner/name
        if looks_local and not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"{path} is not a pipeline folder (no model_index.json there) and not a Hub id "
                                    "(owner/name).")
        check_untrusted_config(cls, pretrained_model_name_or_path, kwargs)
        with own_pipeline_class(cls):
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            pipe.model_card = _read_card(path)
        else:  # a Hub id: it is the model's id, and its card comes from the same snapshot when cached
            if not pipe.config.get("hub_id"):
                pipe.register_to_config(hub_id=path)
            try:
                from huggingface_hub import hf_hub_download

                card = hf_hub_download(path, "README.md", revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"))
                with open(card, encoding="utf-8") as f:
                    pipe.model_card = f.read()
            except Exception:  # offline or no card: a fresh one is rendered on save
                pipe.model_card = None
        return pipe

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        push_to_hub: bool = False, **kwargs):
        """Save weights (safetensors only), configs and the model card (``README.md``: the one loaded or set
        in ``pipe.model_card``, else one rendered from the config). ``push_to_hub=True`` uploads the folder
        as :meth:`push_to_hub` does (``repo_id`` defaults to the folder name)."""
        if not safe_serialization:
            raise ValueError("dpdm-diffusers saves weights as safetensors only (safe_serialization=False would write "
                             "pickle files, which its loader refuses).")
        super().save_pretrained(save_directory, safe_serialization=True, variant=variant, push_to_hub=False)
        drop_source_paths(save_directory)
        write_pipeline_module(save_directory)
        with open(os.path.join(save_directory, "README.md"), "w", encoding="utf-8") as f:
            f.write(self._card())
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(str(save_directory)))
            return self.push_to_hub(repo_id, variant=variant, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        model_card: str | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        subfolder: str | None = None,
        local_cache: bool | str | os.PathLike = False,
    ):
        """Save the pipeline (safetensors) with its model card and upload it to the Hub as ``repo_id``.

        ``model_card`` replaces the card's Markdown; by default the pipeline's own card is used (the loaded or
        trained one, or one rendered from the config), its loading lines naming ``repo_id``. The id is recorded in the
        config (``hub_id``), so models fine-tuned from this one name it as their base. ``subfolder`` uploads into that
        folder of the repository, as diffusers' ``push_to_hub`` does.

        ``local_cache``: try sharing offline. Nothing is uploaded: the repository is written into the Hugging Face
        cache (``True``: huggingface_hub's default, ``HF_HUB_CACHE``; or the given folder) exactly as a download
        would leave it, so ``DownscalingPipeline.from_pretrained(repo_id)`` (with ``cache_dir`` for a given folder)
        then loads it through huggingface_hub, offline. Returns the snapshot folder.
        """
        import tempfile

        from huggingface_hub.constants import HF_HUB_OFFLINE

        if not local_cache and HF_HUB_OFFLINE:
            raise RuntimeError("HF_HUB_OFFLINE is set, so nothing can be uploaded. To try sharing offline, "
                               f"push_to_hub({repo_id!r}, local_cache=True) writes the repository into the Hugging "
                               "Face cache, from which from_pretrained(repo_id) loads it.")
        if not local_cache:
            from huggingface_hub import create_repo

            repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        self.register_to_config(hub_id=repo_id)
        if model_card is not None:
            self.model_card = model_card
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant)
            with open(f"{tmp}/README.md", "w", encoding="utf-8") as f:
                f.write(self._card(repo_id))
            if local_cache:
                return write_to_hub_cache(tmp, repo_id, None if local_cache is True else local_cache, subfolder)
            from huggingface_hub import upload_folder

            return upload_folder(
                repo_id=repo_id, folder_path=tmp, path_in_repo=subfolder, token=token, create_pr=create_pr,
                commit_message=commit_message or f"Upload {type(self).__name__}",
            )

    def _card(self, repo_id: str | None = None) -> str:
        """The card to save: the loaded or trained one, the folder's (generic loading keeps none), else a new one."""
        from dpdm_diffusers.model_card import PLACEHOLDER_ID, render_model_card

        folder = str(getattr(self, "name_or_path", "") or "")
        card = self.model_card or (_read_card(folder) if folder and os.path.isdir(folder) else None)
        card = card or render_model_card(dict(self.config), repo_id=repo_id, pipe=self)
        return card.replace(f'from_pretrained("{PLACEHOLDER_ID}")', f'from_pretrained("{repo_id}")') if repo_id else card


def write_to_hub_cache(folder, repo_id: str, cache_dir=None, subfolder: str | None = None) -> str:
    """Write ``folder`` into the Hugging Face cache as the snapshot of model repository ``repo_id`` (the layout
    huggingface_hub documents: ``models--owner--name/{refs/main, snapshots/<commit>/...}``), so huggingface_hub and
    diffusers resolve ``repo_id`` from it offline. The commit is a hash of the files; an earlier snapshot's files are
    kept beside the new ones, as a pull would keep them. Returns the snapshot folder."""
    import hashlib
    import shutil

    from huggingface_hub.constants import HF_HUB_CACHE

    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise ValueError(f"A Hub id is owner/name, got {repo_id!r}.")
    repo = os.path.join(str(cache_dir or HF_HUB_CACHE), "models--" + repo_id.replace("/", "--"))
    h = hashlib.sha1()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    commit = h.hexdigest()
    snapshot = os.path.join(repo, "snapshots", commit)
    ref = os.path.join(repo, "refs", "main")
    previous = None
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            previous = os.path.join(repo, "snapshots", f.read().strip())
    if previous and os.path.isdir(previous) and previous != snapshot:
        shutil.copytree(previous, snapshot, dirs_exist_ok=True)  # the rest of the repository stays
    shutil.copytree(folder, os.path.join(snapshot, subfolder) if subfolder else snapshot, dirs_exist_ok=True)
    os.makedirs(os.path.dirname(ref), exist_ok=True)
    with open(ref, "w", encoding="utf-8") as f:
        f.write(commit)
    return snapshot


def _read_card(folder: str) -> str | None:
    card = os.path.join(folder, "README.md")
    if not os.path.isfile(card):
        return None
    with open(card, encoding="utf-8") as f:
        return f.read()
