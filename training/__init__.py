"""Accelerate training and fine-tuning scripts (installed as ``dpdm_diffusers.training``)."""
