"""Pipelines of dpdm-diffusers (installed as ``dpdm_diffusers.pipelines``)."""

from .pipeline_downscaling import DownscalingPipeline, DownscalingPipelineOutput

__all__ = ["DownscalingPipeline", "DownscalingPipelineOutput"]
