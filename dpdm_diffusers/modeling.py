"""Conditional UNet and scheduler factories with the channel layout the pipeline expects.

The UNet is a plain diffusers ``UNet2DModel`` (no custom classes, so checkpoints reload anywhere):
``in_channels = 2 * V + S`` (noisy sample V, interpolated low-res V, static fields S) and
``out_channels = V`` for V variables and S static channels.
"""

from __future__ import annotations

from diffusers import DDPMScheduler, UNet2DModel

# name -> (block_out_channels, attention at each level, layers_per_block, dropout)
UNET_PRESETS = {
    # SR3-style net of the paper: 64 base channels, mults (1, 1, 2, 4), attention at 32 and 16 px
    # for 128-px patches (the two deepest levels), dropout 0.1.
    "paper": ((64, 64, 128, 256), (False, False, True, True), 2, 0.1),
    # CPU-sized default: same shape, a quarter of the width, attention only at the deepest level.
    "small": ((32, 64, 128), (False, False, True), 2, 0.0),
    # Default CPU model: no attention (self-attention at 16 px costs ~10x a conv level on CPU), one
    # ResNet block per level, four levels for a wide receptive field at little cost. ~4 us/pixel forward.
    "fast": ((16, 32, 64, 128), (False, False, False, False), 1, 0.0),
    # For tests and smoke runs.
    "tiny": ((8, 16), (False, False), 1, 0.0),
}


def build_unet(num_variables: int, num_static: int, patch_size: int, preset: str = "small", **overrides) -> UNet2DModel:
    """A freshly initialised conditional ``UNet2DModel`` for ``num_variables`` and ``num_static`` channels."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"Unknown UNet preset {preset!r}; expected one of {tuple(UNET_PRESETS)}.")
    channels, attn, layers, dropout = UNET_PRESETS[preset]
    factor = 2 ** (len(channels) - 1)
    if patch_size % factor:
        raise ValueError(f"patch_size {patch_size} must be divisible by {factor} for the {preset!r} UNet.")
    kwargs = dict(
        sample_size=patch_size,
        in_channels=2 * num_variables + num_static,
        out_channels=num_variables,
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        dropout=dropout,
        norm_num_groups=min(8, channels[0]) if preset in ("tiny", "fast") else 32,
        attention_head_dim=8,
    )
    kwargs.update(overrides)
    return UNet2DModel(**kwargs)


# The cosine schedule (T = 1000) ends in a degenerate stretch: alpha_bar falls from 3.7e-3 at t = 959 to 2e-9 at
# t = 999 (the beta cap of 0.999), where an eps-prediction model's x0 estimate divides its error by 5e-5 and blows up.
# The schedule therefore stops at t = 959 (1 / sqrt(alpha_bar) = 16): the first 960 betas of the T = 1000 cosine
# schedule, saved explicitly (`trained_betas`), so every diffusers sampler built from the config with `from_config`
# starts at a safe noise level whatever its timestep spacing. A model trained on T = 1000 (the shipped ones) sees
# exactly the timesteps and noise levels it was trained on; the pure-noise start differs from the t = 999 one by a
# signal fraction of sqrt(3.7e-3) = 6%, less than `leading` spacing already dropped (t = 950 for 20 steps).
NUM_TRAIN_TIMESTEPS = 960


def training_betas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[float]:
    """The first ``num_train_timesteps`` betas of the T = 1000 cosine schedule (Nichol & Dhariwal 2021)."""
    from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

    if not 0 < num_train_timesteps <= 1000:
        raise ValueError(f"num_train_timesteps must be in 1..1000, got {num_train_timesteps}.")
    return [float(b) for b in betas_for_alpha_bar(1000, alpha_transform_type="cosine")[:num_train_timesteps]]


def default_scheduler(**overrides) -> DDPMScheduler:
    """The training schedule: the cosine schedule up to t = 959 (``NUM_TRAIN_TIMESTEPS``), eps-prediction, and no
    sample clipping (diffusers clips to [-1, 1] by default, which is wrong for standardised climate data).

    Every key a derived sampler needs is passed explicitly: diffusers' ``from_config`` drops keys that were left at
    their default (``_use_default_values``) and would give another class its own defaults (another schedule,
    ``linspace`` spacing)."""
    kwargs = dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        trained_betas=training_betas(NUM_TRAIN_TIMESTEPS),
        beta_schedule="squaredcos_cap_v2",  # informative only: trained_betas take precedence in every scheduler
        prediction_type="epsilon",
        clip_sample=False,
        timestep_spacing="leading",
        steps_offset=0,
    )
    kwargs.update(overrides)
    return DDPMScheduler(**kwargs)


def default_sampler(config=None):
    """DPM-Solver++ (2nd order) on the training schedule, the sampler chosen in benchmarks/results/samplers.md.

    ``leading`` spacing, as the shipped model's spread was calibrated with it (10 steps start at t = 864). Any other
    spacing or sampler is safe too: the schedule ends at t = 959 (see ``NUM_TRAIN_TIMESTEPS``).
    """
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(
        config if config is not None else default_scheduler().config, algorithm_type="dpmsolver++", timestep_spacing="leading"
    )


def preset_of(unet) -> str | None:
    """The name of the :data:`UNET_PRESETS` entry a UNet (or a UNet config) was built from, or ``None``."""
    from types import SimpleNamespace

    c = unet.config if hasattr(unet, "config") else SimpleNamespace(**unet)
    attn = tuple(t.startswith("Attn") for t in c.down_block_types)
    for name, (channels, attention, layers, _) in UNET_PRESETS.items():
        if tuple(c.block_out_channels) == tuple(channels) and attn == tuple(attention) and c.layers_per_block == layers:
            return name
    return None


def describe_unet(unet: UNet2DModel) -> str:
    """Architecture facts of a UNet as a card line, read off the weights and config (not off a training option)."""
    c = unet.config
    preset = preset_of(unet)
    levels = [i for i, t in enumerate(c.down_block_types) if t.startswith("Attn")]
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    return (f"`UNet2DModel` ({f'preset `{preset}`' if preset else 'custom'}), block_out_channels "
            f"{tuple(c.block_out_channels)}, {c.layers_per_block} ResNet layer(s) per block, attention at "
            f"{'levels ' + ', '.join(map(str, levels)) if levels else 'no level'}, {c.in_channels} -> {c.out_channels} "
            f"channels, {params:.2f} M parameters")
