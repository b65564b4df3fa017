"""ddpm_lib: Denoising Diffusion Probabilistic Models, small, exact and tested.

The book that explains every function chapter by chapter lives in ``book/``.
"""

import os
import sys

__version__ = "0.1.0"  # first, so that submodules can import it

# The ddpm command (the console script, or python -m ddpm_lib, also under torchrun) runs torch with
# OMP_WAIT_POLICY=PASSIVE unless the user chose a policy: spinning OpenMP threads slow training ten
# times or more whenever another process holds a core. OpenMP reads the variable once, when torch
# loads it, so this comes before any import of torch. Library users keep their own environment.
_argv = getattr(sys, "argv", None) or [""]
if not os.environ.get("OMP_WAIT_POLICY") and (
    _argv[0] == "-m" or os.path.basename(_argv[0]) in ("ddpm", "ddpm.exe")
):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from ddpm_lib.checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from ddpm_lib.classifier import judge_digits, load_digits_classifier  # noqa: E402
from ddpm_lib.data import dataset_info, load_dataset  # noqa: E402
from ddpm_lib.diffusion import (  # noqa: E402
    diffusion_loss,
    predict_eps,
    predict_x0,
    q_posterior,
    q_sample,
    q_sample_iterative,
)
from ddpm_lib.ema import EMA  # noqa: E402
from ddpm_lib.metrics import (  # noqa: E402
    digits_frechet_distance,
    frechet_distance,
    sliced_wasserstein,
    variational_bound,
)
from ddpm_lib.mixture import GaussianMixture  # noqa: E402
from ddpm_lib.models import MLP, UNet, build_model, count_parameters  # noqa: E402
from ddpm_lib.samplers import (  # noqa: E402
    Trajectory,
    ddim_step,
    ddpm_step,
    sample,
    timestep_sequence,
)
from ddpm_lib.schedule import NoiseSchedule, extract  # noqa: E402
from ddpm_lib.training import TrainConfig, Trainer, default_config  # noqa: E402

__all__ = [
    "EMA",
    "MLP",
    "CheckpointError",
    "GaussianMixture",
    "NoiseSchedule",
    "TrainConfig",
    "Trainer",
    "Trajectory",
    "UNet",
    "__version__",
    "build_model",
    "count_parameters",
    "dataset_info",
    "ddim_step",
    "ddpm_step",
    "default_config",
    "diffusion_loss",
    "digits_frechet_distance",
    "extract",
    "frechet_distance",
    "judge_digits",
    "load_checkpoint",
    "load_dataset",
    "load_digits_classifier",
    "model_from_checkpoint",
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
]
