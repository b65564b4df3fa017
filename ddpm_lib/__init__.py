"""ddpm_lib: Denoising Diffusion Probabilistic Models, small, exact and tested.

The book that explains every function chapter by chapter lives in ``book/``.
"""

# First, before anything imports torch: the ddpm command's OpenMP setting (see _omp).
from ddpm_lib import _omp  # noqa: F401
from ddpm_lib._version import __version__
from ddpm_lib.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from ddpm_lib.classifier import digits_frechet_distance, judge_digits, load_digits_classifier
from ddpm_lib.config import TrainConfig, default_config
from ddpm_lib.data import dataset_info, load_dataset
from ddpm_lib.diffusion import (
    diffusion_loss,
    predict_eps,
    predict_x0,
    q_posterior,
    q_sample,
    q_sample_iterative,
    x0_from_eps,
)
from ddpm_lib.ema import EMA
from ddpm_lib.guidance import NULL_CLASS, drop_labels, guided_eps
from ddpm_lib.metrics import frechet_distance, sliced_wasserstein, variational_bound
from ddpm_lib.mixture import GaussianMixture
from ddpm_lib.models import MLP, MLPConfig, UNet, UNetConfig, build_model, count_parameters
from ddpm_lib.ode_solvers import dpm_solver_2m_step, heun_step, lambda_spaced_timesteps
from ddpm_lib.samplers import (
    Trajectory,
    ddim_step,
    ddpm_step,
    sample,
    timestep_sequence,
)
from ddpm_lib.schedule import NoiseSchedule, extract, posterior_coefficients
from ddpm_lib.training import Trainer

__all__ = [
    "EMA",
    "MLP",
    "MLPConfig",
    "NULL_CLASS",
    "CheckpointError",
    "GaussianMixture",
    "NoiseSchedule",
    "TrainConfig",
    "Trainer",
    "Trajectory",
    "UNet",
    "UNetConfig",
    "__version__",
    "build_model",
    "count_parameters",
    "dataset_info",
    "ddim_step",
    "ddpm_step",
    "default_config",
    "diffusion_loss",
    "dpm_solver_2m_step",
    "drop_labels",
    "digits_frechet_distance",
    "extract",
    "frechet_distance",
    "guided_eps",
    "heun_step",
    "judge_digits",
    "lambda_spaced_timesteps",
    "load_checkpoint",
    "load_dataset",
    "load_digits_classifier",
    "model_from_checkpoint",
    "posterior_coefficients",
    "predict_eps",
    "predict_x0",
    "q_posterior",
    "q_sample",
    "q_sample_iterative",
    "sample",
    "save_checkpoint",
    "sliced_wasserstein",
    "timestep_sequence",
    "variational_bound",
    "x0_from_eps",
]
