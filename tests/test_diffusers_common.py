"""diffusers' common pipeline tests (``tests/pipelines/test_pipelines_common.py``, ``PipelineTesterMixin``), adapted.

The mapping: the low-res field plays the prompt, ``num_members`` plays ``num_images_per_prompt``, a low-res field
with several time steps is a batch of prompts, and ``tiles_per_call`` is a memory knob that must never change the
result. Tests of text encoders, guidance, VAEs, attention processors and IP adapters have no counterpart here.
Accelerator-only tests (model/sequential/group offload, device maps) skip on a CPU-only machine.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import make_low_res, make_pipeline, make_static
from diffusers import DiffusionPipeline, HeunDiscreteScheduler

from dpdm_diffusers import DownscalingPipeline
from dpdm_diffusers.grids import Grid, interpolate

STEPS = 3
requires_accelerator = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (offload hooks)")


def get_dummy_inputs(seed=0, ntime=2, **kw):
    low = make_low_res(ntime=ntime)
    inputs = dict(low_res=low, static_fields=make_static(Grid.from_xarray(low).refine(4)), num_inference_steps=STEPS,
                  generator=torch.Generator().manual_seed(seed), output_type="np")
    inputs.update(kw)
    return inputs


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def two_stage_pipeline():
    pipe = make_pipeline()
    regression = make_pipeline(seed=1).unet
    two = DownscalingPipeline(unet=pipe.unet, scheduler=pipe.scheduler, regression_unet=regression, stochastic_std=[0.7],
                              **{k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in pipe.components
                                 and k != "stochastic_std"})
    two.set_progress_bar_config(disable=True)
    return two


# --- loading and saving ---------------------------------------------------------------------------
def test_save_load_local_and_generic_entry_point(tmp_path):
    pipe = make_pipeline()
    ref = pipe(**get_dummy_inputs()).members
    pipe.save_pretrained(tmp_path)
    ours = DownscalingPipeline.from_pretrained(tmp_path)
    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    for loaded in (ours, generic):
        assert type(loaded) is DownscalingPipeline  # the installed class itself, never a copy from the folder
        loaded.set_progress_bar_config(disable=True)
        assert max_diff(loaded(**get_dummy_inputs()).members, ref) < 1e-5
    # the generic path keeps the folder's card for the next save
    assert generic._card() == (tmp_path / "README.md").read_text()


def test_generic_loading_needs_trust_remote_code_ours_runs_no_folder_code(tmp_path):
    make_pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)
    # DownscalingPipeline.from_pretrained never imports the folder's module: a stub that would fail changes nothing
    (tmp_path / "pipeline_downscaling.py").write_text("raise RuntimeError('folder code was run')\n")
    assert isinstance(DownscalingPipeline.from_pretrained(tmp_path), DownscalingPipeline)
    with pytest.raises(ValueError, match="runs no code"):
        DownscalingPipeline.from_pretrained(tmp_path, trust_remote_code=True)


@pytest.mark.parametrize("folder", ["models/dpdm-glosea4-ts-x4", "models/regression-glosea4-ts-x4"])
def test_shipped_models_load_with_the_generic_entry_point(folder):
    root = os.path.join(os.path.dirname(__file__), "..", folder)
    pipe = DiffusionPipeline.from_pretrained(root, trust_remote_code=True)
    assert type(pipe) is DownscalingPipeline and pipe.config.variables == ["surface_temperature"]
    index = json.loads(open(os.path.join(root, "model_index.json")).read())
    assert index["_class_name"] == ["pipeline_downscaling", "DownscalingPipeline"]


def test_save_load_optional_components(tmp_path):
    two = two_stage_pipeline()
    ref = two(**get_dummy_inputs(num_members=2)).members
    two.save_pretrained(tmp_path / "two")
    loaded = DownscalingPipeline.from_pretrained(tmp_path / "two")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.regression_unet is not None and max_diff(loaded(**get_dummy_inputs(num_members=2)).members, ref) < 1e-5
    one = make_pipeline()
    one.save_pretrained(tmp_path / "one")
    assert DownscalingPipeline.from_pretrained(tmp_path / "one").regression_unet is None


def test_serialization_with_variants(tmp_path):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path, variant="fp16")
    files = {os.path.relpath(os.path.join(r, f), tmp_path) for r, _, fs in os.walk(tmp_path) for f in fs}
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files and not any(f.endswith(".bin") for f in files)
    loaded = DownscalingPipeline.from_pretrained(tmp_path, variant="fp16")
    for a, b in zip(pipe.unet.parameters(), loaded.unet.parameters()):
        assert torch.equal(a, b)


def test_save_load_float16_and_to_dtype(tmp_path):
    pipe = make_pipeline()
    ref = pipe(**get_dummy_inputs()).mean
    pipe.to(torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.dtype == torch.float16
    pipe.save_pretrained(tmp_path)
    loaded = DownscalingPipeline.from_pretrained(tmp_path, torch_dtype=torch.float16)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet.dtype == torch.float16
    out = loaded(**get_dummy_inputs()).mean
    # fp16 weights and activations: the field is 5 K per model-space unit, so 0.1 K is a 2% model-space error
    assert np.isfinite(out).all() and max_diff(out, ref) < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_inference_on_cpu(dtype):
    pipe = make_pipeline()
    ref = pipe(**get_dummy_inputs()).mean
    pipe.autocast_dtype = dtype  # float32 weights, reduced-precision arithmetic (dpdm_diffusers.speed)
    out = pipe(**get_dummy_inputs()).mean
    # bf16 keeps 8 mantissa bits: 0.5 K is 0.1 model-space units; the run must differ (the dtype was used)
    assert np.isfinite(out).all() and 0 < max_diff(out, ref) < 0.5


def test_to_device_and_components_function():
    pipe = make_pipeline().to("cpu")
    assert pipe.device.type == "cpu" and pipe.unet.device.type == "cpu"
    assert set(pipe.components) == {"unet", "scheduler", "regression_unet"}
    # components rebuild the same pipeline, as diffusers documents it: the statistics come with the UNet's pipeline
    pipe.register_to_config(residual_std=[0.3])  # a later change (e.g. calibration) is what is rebuilt
    again = DownscalingPipeline(**pipe.components)
    again.set_progress_bar_config(disable=True)
    assert again.config.residual_std == [0.3] and again.config.variables == pipe.config.variables
    assert max_diff(again(**get_dummy_inputs()).members, pipe(**get_dummy_inputs()).members) == 0
    assert DownscalingPipeline(**pipe.components, norm_mean=[290.0]).config.norm_mean == [290.0]  # explicit wins
    import pickle

    assert pickle.loads(pickle.dumps(pipe.unet)) is not None  # nothing unpicklable was attached to the module


def test_from_pipe_shares_components_and_gives_the_same_output():
    pipe = make_pipeline()
    other = DownscalingPipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    assert other.unet is pipe.unet and other.config.norm_mean == pipe.config.norm_mean
    assert max_diff(other(**get_dummy_inputs()).members, pipe(**get_dummy_inputs()).members) == 0


# --- outputs, batching, determinism --------------------------------------------------------------
def test_dict_tuple_outputs_equivalent():
    pipe = make_pipeline()
    as_dict = pipe(**get_dummy_inputs(num_members=2))
    as_tuple = pipe(**get_dummy_inputs(num_members=2), return_dict=False)
    for a, b in zip((as_dict.members, as_dict.mean, as_dict.std), as_tuple):
        assert max_diff(a, b) == 0


@pytest.mark.parametrize("num_members", [1, 3])
def test_num_images_per_prompt_is_num_members(num_members):
    pipe = make_pipeline()
    for ntime in (1, 2):
        out = pipe(**get_dummy_inputs(ntime=ntime, num_members=num_members))
        assert out.members.shape == (num_members, ntime, 1, 24, 32)


def test_inference_batch_single_identical():
    """A batch of time steps gives each time step exactly what it gets alone (noise keyed by the time stamp)."""
    pipe = make_pipeline()
    batch = pipe(**get_dummy_inputs(ntime=2, num_members=2)).members
    low = make_low_res(ntime=2)
    for i in range(2):
        single = pipe(**get_dummy_inputs(num_members=2, low_res=low.isel(time=[i]))).members
        assert max_diff(single[:, 0], batch[:, i]) < 1e-5


def test_tiles_per_call_never_changes_the_result_and_batch_size_is_deprecated():
    pipe = make_pipeline()
    ref = pipe(**get_dummy_inputs(num_members=2), tiles_per_call=1).members
    assert max_diff(pipe(**get_dummy_inputs(num_members=2), tiles_per_call=64).members, ref) < 1e-4  # summation order
    with pytest.warns(FutureWarning, match="tiles_per_call"):
        old = pipe(**get_dummy_inputs(num_members=2), batch_size=4).members
    assert old.shape[0] == 2 and max_diff(old, ref) < 1e-4  # batch_size=4 never meant 4 samples
    with pytest.raises(ValueError, match="tiles_per_call only"):
        pipe(**get_dummy_inputs(), batch_size=4, tiles_per_call=4)


def test_same_generator_same_output_and_different_seed_different_output():
    pipe = make_pipeline()
    a = pipe(**get_dummy_inputs(seed=0)).members
    assert max_diff(pipe(**get_dummy_inputs(seed=0)).members, a) == 0
    assert max_diff(pipe(**get_dummy_inputs(seed=1)).members, a) > 1e-3


# --- the standard call API -----------------------------------------------------------------------
def test_pipeline_call_signature_is_documented():
    params = [p for p in inspect.signature(DownscalingPipeline.__call__).parameters if p != "self"]
    doc = DownscalingPipeline.__call__.__doc__
    undocumented = [p for p in params if f"{p} (" not in doc and f"{p}, " not in doc]
    assert not undocumented
    for name in ("latents", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "output_type", "generator"):
        assert name in params


def test_callback_inputs_and_replacing_latents():
    pipe = make_pipeline()
    seen = []

    def callback(p, i, t, kwargs):
        assert set(kwargs) == {"latents", "model_output"} and p is pipe
        seen.append(i)
        if i == p.num_timesteps - 1:  # zero the final sample: the residual model then returns its interpolated input
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    inputs = get_dummy_inputs(ntime=1)
    out = pipe(**inputs, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "model_output"])
    assert seen == list(range(STEPS)) and pipe.num_timesteps == STEPS
    low = inputs["low_res"]
    lerp = interpolate(low.tas.values, Grid.from_xarray(low), Grid.from_xarray(low).refine(4), "bilinear")
    assert max_diff(out.members[0, :, 0], lerp[:, 0] if lerp.ndim == 4 else lerp) < 1e-4
    with pytest.raises(ValueError, match="not among"):
        pipe(**get_dummy_inputs(), callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_pipeline_callback_objects_are_accepted():
    from diffusers.callbacks import PipelineCallback

    class Record(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.steps = getattr(self, "steps", 0) + 1
            return callback_kwargs

    rec = Record()
    pipe = make_pipeline()
    ref = pipe(**get_dummy_inputs()).members
    assert max_diff(pipe(**get_dummy_inputs(), callback_on_step_end=rec).members, ref) == 0 and rec.steps == STEPS


def test_interrupt_returns_the_latents_of_the_interrupted_step():
    pipe = make_pipeline()
    stop_at, captured = 1, {}

    def capture(p, i, t, kwargs):
        if i == stop_at:
            captured["latents"] = kwargs["latents"].clone()
        return {}

    def interrupt(p, i, t, kwargs):
        if i == stop_at:
            p._interrupt = True
        return {}

    pipe(**get_dummy_inputs(num_inference_steps=4), callback_on_step_end=capture)
    out = pipe(**get_dummy_inputs(num_inference_steps=4, output_type="latent"), callback_on_step_end=interrupt)
    assert pipe.interrupt
    expected = captured["latents"][..., :24, :32].reshape(1, 2, 1, 24, 32)
    assert torch.allclose(out.members, expected)


def test_latents_argument_replaces_the_generator_noise():
    from diffusers import DDIMScheduler

    pipe = make_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # deterministic steps: only the start is random
    canvas = (2 * 2, 1, 24, 32)  # members x time steps, variables, canvas (>= one 16-px patch)
    latents = torch.randn(canvas, generator=torch.Generator().manual_seed(5))
    a = pipe(**get_dummy_inputs(num_members=2, latents=latents, generator=torch.Generator().manual_seed(0))).members
    b = pipe(**get_dummy_inputs(num_members=2, latents=latents.reshape(2, 2, 1, 24, 32),
                                generator=torch.Generator().manual_seed(99))).members
    assert max_diff(a, b) == 0 and max_diff(a, pipe(**get_dummy_inputs(num_members=2)).members) > 1e-3
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(**get_dummy_inputs(num_members=2, latents=torch.randn(3, 1, 24, 32)))


def test_output_type_latent_is_model_space():
    pipe = make_pipeline()  # residual target, norm_std 10 K x residual_std 0.5: one model-space unit is 5 K
    inputs = get_dummy_inputs(num_members=2)
    latent = pipe(**get_dummy_inputs(num_members=2, output_type="latent")).members
    phys = pipe(**inputs).members
    low = inputs["low_res"]
    lerp = interpolate(low.tas.values[:, None], Grid.from_xarray(low), Grid.from_xarray(low).refine(4), "bilinear")
    assert isinstance(latent, torch.Tensor) and latent.shape == (2, 2, 1, 24, 32)
    assert max_diff(lerp[None] + 5.0 * latent.numpy(), phys) < 1e-3


def test_progress_bar_counts_inference_steps():
    pipe = make_pipeline()
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, disable=False, mininterval=0)
    pipe(**get_dummy_inputs(num_inference_steps=3))
    assert pipe.num_timesteps == 5  # Heun: two UNet calls per step but the last
    assert "3/3" in stream.getvalue() and "5/5" not in stream.getvalue()
    quiet = io.StringIO()
    pipe.set_progress_bar_config(file=quiet, disable=True)
    pipe(**get_dummy_inputs(num_inference_steps=3))
    assert quiet.getvalue() == ""


# --- device-only features ------------------------------------------------------------------------
@requires_accelerator
@pytest.mark.parametrize("enable", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_cpu_offload_forward_pass(enable):
    pipe = make_pipeline()
    ref = pipe(**get_dummy_inputs()).members
    getattr(pipe, enable)()
    assert max_diff(pipe(**get_dummy_inputs()).members, ref) < 1e-3


def test_offload_without_an_accelerator_says_so():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(Exception, match="(?i)accelerat|cuda|gpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_pipeline().enable_model_cpu_offload()


def test_model_cards_follow_the_hub_structure():
    """Every card (rendered, trained, shipped) says what the model is, how to use it, what it is for and not for, its
    limits and how to cite it, under the Hub's front matter."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cards = {"rendered": make_pipeline()._card("me/tiny"), "model_card.md": (root / "model_card.md").read_text()}
    for folder in sorted((root / "models").iterdir()):
        if (folder / "README.md").is_file():
            cards[folder.name] = (folder / "README.md").read_text()
    assert len(cards) >= 4
    for name, card in cards.items():
        assert card.startswith("---\nlibrary_name: diffusers"), name
        headings = re.findall(r"^## (\w[\w ]*)", card, re.M)
        for wanted in ("How to use", "Uses", "Model", "Limitations", "Citation"):
            assert wanted in headings, (name, wanted, headings)
