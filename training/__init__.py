"""Training and fine-tuning (installed as ``dpdm_diffusers.training``): the recipe and the library it uses.

* ``train_dpdm``: the Accelerate training script; ``train()`` is the one training loop, ``run(cfg)`` checks a config
  and trains (a two-stage ``init_from`` model: both stages).
* ``config``: ``TrainingConfig``, YAML + command line (``parse_args``), ``render_command``, start-up checks.
* ``finetune``: ``finetune()`` / ``finetune_config()``, what ``dpdm finetune`` builds and runs.
* ``data``, ``stages``, ``checkpoints``, ``validation``, ``card``, ``utils``: the pieces of a run.
"""
