"""Loader stub for diffusers' generic entry point; the pipeline itself comes from the installed package.

    pip install dpdm-diffusers
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("<this folder or Hub id>", trust_remote_code=True)

`dpdm_diffusers.DownscalingPipeline.from_pretrained(...)` loads the same folder without running this file.
"""

from dpdm_diffusers.pipelines.pipeline_downscaling import DownscalingPipeline, DownscalingPipelineOutput  # noqa: F401
