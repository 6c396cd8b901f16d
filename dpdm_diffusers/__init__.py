"""dpdm-diffusers: probabilistic downscaling of climate fields with conditional diffusion models.

``from dpdm_diffusers import DownscalingPipeline`` is the entry point; the pipeline lives in
``dpdm_diffusers.pipelines`` (the repository's ``pipelines/`` folder) and is imported lazily so that
light modules (grids, metrics, data) load without diffusers' import cost.
"""

__version__ = "0.1.0"

__all__ = ["DownscalingPipeline", "DownscalingPipelineOutput", "__version__"]


def __getattr__(name):
    if name in ("DownscalingPipeline", "DownscalingPipelineOutput"):
        from dpdm_diffusers.pipelines import pipeline_downscaling

        return getattr(pipeline_downscaling, name)
    raise AttributeError(f"module 'dpdm_diffusers' has no attribute {name!r}")
