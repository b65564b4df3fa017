"""ddpm_lib: Denoising Diffusion Probabilistic Models, small, exact and tested.

The book that explains every function chapter by chapter lives in ``book/``.
"""

from ddpm_lib.diffusion import (
    diffusion_loss,
    predict_eps,
    predict_x0,
    q_posterior,
    q_sample,
    q_sample_iterative,
)
from ddpm_lib.mixture import GaussianMixture
from ddpm_lib.samplers import Trajectory, ddim_step, ddpm_step, sample, timestep_sequence
from ddpm_lib.schedule import NoiseSchedule, extract

__version__ = "0.1.0"

__all__ = [
    "GaussianMixture",
    "NoiseSchedule",
    "Trajectory",
    "__version__",
    "ddim_step",
    "ddpm_step",
    "diffusion_loss",
    "extract",
    "predict_eps",
    "predict_x0",
    "q_posterior",
    "q_sample",
    "q_sample_iterative",
    "sample",
    "timestep_sequence",
]
