"""Inference pipelines that load public checkpoints from local folders."""

from jaxgen.pipelines.stable_diffusion import (
    PipelineFolderError,
    StableDiffusion,
    StableDiffusionXL,
    check_pipeline_folder,
)

__all__ = ["PipelineFolderError", "StableDiffusion", "StableDiffusionXL", "check_pipeline_folder"]
