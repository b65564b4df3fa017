"""Sample quality after the same CPU time: ddpm_lib against diffusers and lucidrains, on the digits.

U-Nets of about the same size (ddpm_lib's digits U-Net, 0.76 M parameters; diffusers'
UNet2DModel, 0.70 M; lucidrains' Unet, 0.83 M) train on the 1437 training digits for the same
wall-clock budget on the same machine, one after the other, each with its own library's recipe:

- ddpm_lib: ``Trainer`` with ``default_config("digits")`` (AdamW lr 2e-3, 200 warm-up steps,
  gradient clipping, EMA 0.999, batch 128, L_simple); ``ddpm_lib-minsnr`` is the same with the
  loss weighted by min(SNR, 5) / SNR (Hang et al. 2023); ``ddpm_lib-v`` and ``ddpm_lib-x0``
  train the same network to predict v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho
  2022) or x_0 itself;
- diffusers: the recipe of its ``train_unconditional`` example (DDPMScheduler with the linear
  schedule, AdamW lr 1e-4 with betas (0.95, 0.999) and weight decay 1e-6, 500 warm-up steps,
  EMAModel with power 3/4, batch 128);
- lucidrains: ``GaussianDiffusion(objective="pred_noise", beta_schedule="linear")`` with the
  defaults of its ``Trainer`` (Adam lr 1e-4, betas (0.9, 0.99), EMA 0.995 every 10 steps,
  batch 128).

Each contender trains once per seed (the seed sets its initial weights, data order and noise).
Then one sampler and one scorer judge them all: the EMA network draws ``--n`` digits with
ddpm_lib's 1000-step DDPM (small variance; the starting noise is the same for every contender of
a seed), scored by the Frechet distance to the training digits in the digits classifier's
features (floor: the real test digits) and the share of clear digits. The table gives the mean
over seeds and, after the ±, half the range between the seeds.

    pip install -r benchmarks/requirements.txt
    python benchmarks/peers_quality.py --minutes 10 --seeds 2 --n 500 --threads 1
    python benchmarks/peers_quality.py --minutes 5 --contenders ddpm_lib "ddpm_lib:lr=1e-3" \
        "ddpm_lib:attention_resolutions=()" --out recipe_trial  # recipes: see contender()
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from results_files import write_results
from train_throughput import DiffusersAsEps  # benchmarks/ is on the path when run as a script

from ddpm_lib import (
    NoiseSchedule,
    Trainer,
    default_config,
    judge_digits,
    load_dataset,
    load_digits_classifier,
    model_from_checkpoint,
    sample,
)
from ddpm_lib.classifier import digits_features
from ddpm_lib.config import DIGITS_UNET
from ddpm_lib.diffusion import eps_from_x0, q_sample
from ddpm_lib.metrics import frechet_distance

BATCH = 128


def batches(images: torch.Tensor, seed: int):
    """Endless shuffled batches of the training digits."""
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(images), generator=g).split(BATCH):
            if len(idx) == BATCH:
                yield images[idx]


def train_ours(images: torch.Tensor, minutes: float, seed: int, target: str = "eps", **recipe):
    with tempfile.TemporaryDirectory() as out:
        config = default_config(
            "digits", steps=10**9, max_minutes=minutes, out=out, sample_every=0,
            checkpoint_every=0, log_every=10**9, seed=seed, **recipe,
        )  # fmt: skip
        if target == "eps":
            trainer = Trainer(config, progress=False, log=None)
        else:
            trainer = OtherTargetTrainer(config, target, progress=False, log=None)
        summary = trainer.train()
        model, schedule = model_from_checkpoint(trainer.state_dict(), use_ema=True)
    if target != "eps":
        model = AsNoisePredictor(model, schedule, target)
    return model.eval(), summary["steps"], summary["seconds"]


class AsNoisePredictor(torch.nn.Module):
    """A network trained to predict v or x_0, seen as a noise predictor so that the samplers use
    it unchanged. With x_t = a x_0 + s eps (a = sqrt(abar_t), s = sqrt(1 - abar_t)):
    v = a eps - s x_0 (Salimans & Ho 2022) gives eps = a v + s x_t, and x_0 gives
    eps = (x_t - a x_0) / s."""

    def __init__(self, network: torch.nn.Module, schedule: NoiseSchedule, target: str) -> None:
        super().__init__()
        self.network, self.target = network, target
        self.register_buffer("a", schedule.sqrt_alphas_cumprod.clone())
        self.register_buffer("s", schedule.sqrt_one_minus_alphas_cumprod.clone())

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        per_item = (-1,) + (1,) * (x_t.dim() - 1)
        a, s = self.a[t].view(per_item), self.s[t].view(per_item)
        prediction = self.network(x_t, t)
        if self.target == "v":
            return a * prediction + s * x_t
        return eps_from_x0(x_t, prediction, a, s)


class OtherTargetTrainer(Trainer):
    """ddpm_lib's recipe with the network trained to predict v or x_0 instead of eps. Seen
    through AsNoisePredictor, the loss || v - v_theta ||^2 is || eps - eps_theta ||^2 / abar_t
    and || x_0 - x0_theta ||^2 is || eps - eps_theta ||^2 / SNR_t: both count the noisy steps
    more than L_simple does, x_0 far more."""

    def __init__(self, config, target: str, **options) -> None:
        if target not in ("v", "x0"):
            raise ValueError(f"target must be 'v' or 'x0', got {target!r}")
        super().__init__(config, **options)
        self.target = target

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        t = torch.randint(self.schedule.T, (x0.shape[0],), generator=self.noise_generator)
        noise = torch.randn(x0.shape, generator=self.noise_generator)
        x_t = q_sample(self.schedule, x0, t, noise)
        if self.target == "v":
            a = self.schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
            s = self.schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
            target = a * noise - s * x0
        else:
            target = x0
        return F.mse_loss(self.net(x_t, t).float(), target)


def train_ours_min_snr(images: torch.Tensor, minutes: float, seed: int):
    return train_ours(images, minutes, seed, min_snr_gamma=5.0)


def train_diffusers(images: torch.Tensor, minutes: float, seed: int):
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    net = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=64,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=500)
    ema = EMAModel(net.parameters(), inv_gamma=1.0, power=0.75, max_decay=0.9999)
    steps, start = 0, time.perf_counter()
    for x0 in batches(images, seed=1000 + seed):
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (BATCH,))
        loss = F.mse_loss(net(noise_scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        ema.step(net.parameters())
        steps += 1
        if time.perf_counter() - start > 60 * minutes:
            break
    seconds = time.perf_counter() - start
    ema.copy_to(net.parameters())
    return DiffusersAsEps(net).eval(), steps, seconds


def train_lucidrains(images: torch.Tensor, minutes: float, seed: int):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    torch.manual_seed(seed)
    net = Unet(dim=32, dim_mults=(1, 2), channels=1)
    diffusion = GaussianDiffusion(
        net, image_size=8, timesteps=1000, objective="pred_noise", beta_schedule="linear"
    )
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10)
    steps, start = 0, time.perf_counter()
    for x0 in batches(images, seed=2000 + seed):
        loss = diffusion((x0 + 1) / 2)  # it takes images in [0, 1] and normalises them itself
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
        steps += 1
        if time.perf_counter() - start > 60 * minutes:
            break
    seconds = time.perf_counter() - start
    return copy.deepcopy(ema.ema_model.model).eval(), steps, seconds


CONTENDERS = {
    "ddpm_lib": train_ours,
    "ddpm_lib-minsnr": train_ours_min_snr,
    "ddpm_lib-v": functools.partial(train_ours, target="v"),
    "ddpm_lib-x0": functools.partial(train_ours, target="x0"),
    "diffusers": train_diffusers,
    "lucidrains": train_lucidrains,
}


def contender(name: str):
    """A trainer by name; ``ddpm_lib:key=value,...`` is ddpm_lib's recipe with ``TrainConfig``
    fields (or keys of the digits U-Net) changed, e.g. ``ddpm_lib:lr=1e-3,base_channels=48``."""
    if name in CONTENDERS:
        return CONTENDERS[name]
    base, _, changes = name.partition(":")
    if base != "ddpm_lib" or not changes:
        raise SystemExit(f"contender {name!r}: one of {list(CONTENDERS)} or ddpm_lib:key=value,...")
    recipe, model_config = {}, {}
    for change in changes.split(","):
        key, _, value = change.partition("=")
        try:
            (model_config if key in DIGITS_UNET else recipe)[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"contender {name!r}: {change!r} is not key=<literal>") from None
    default_config("digits", model_config=model_config, **recipe)  # unknown keys fail here
    return functools.partial(train_ours, model_config=model_config, **recipe)


SCORES = ("frechet", "clear_share", "steps", "train_seconds", "sample_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per library")
    parser.add_argument("--n", type=int, default=500, help="samples judged per library and seed")
    parser.add_argument("--seeds", type=int, default=2, help="trainings per library")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--contenders", nargs="+", default=["ddpm_lib", "ddpm_lib-minsnr", "diffusers"],
        help=f"recipes to train: {', '.join(CONTENDERS)} or ddpm_lib:key=value,... (see contender)",
    )  # fmt: skip
    parser.add_argument("--out", default="peers_quality", help="results file name, no suffix")
    args = parser.parse_args()
    trainers = {name: contender(name) for name in args.contenders}  # bad names fail before work
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_dataset("digits", split="train").tensors[0]  # (1437, 1, 8, 8) in [-1, 1]
    test = load_dataset("digits", split="test").tensors[0]
    classifier = load_digits_classifier()
    train_features = digits_features(train, classifier)
    floor = frechet_distance(digits_features(test[: args.n], classifier), train_features)
    schedule = NoiseSchedule.linear()
    runs = {name: [] for name in args.contenders}
    for seed in range(args.seeds):
        for name in args.contenders:
            model, steps, seconds = trainers[name](train, args.minutes, seed)
            start = time.perf_counter()
            with torch.no_grad():
                x = sample(
                    model, schedule, (args.n, 1, 8, 8), sampler="ddpm",
                    generator=torch.Generator().manual_seed(seed), progress=False,
                )  # fmt: skip
            runs[name].append(
                dict(
                    seed=seed,
                    parameters=sum(p.numel() for p in model.parameters()),  # EMA: no grads
                    steps=steps,
                    train_seconds=seconds,
                    sample_seconds=time.perf_counter() - start,
                    frechet=frechet_distance(digits_features(x, classifier), train_features),
                    clear_share=judge_digits(x.clamp(-1, 1), classifier)["confident_share"],
                )
            )
            print(name, json.dumps(runs[name][-1]), flush=True)
    rows = {name: summarise(r) for name, r in runs.items()}
    text = table(rows, floor, min(args.n, len(test)), args)
    print("\n" + text)
    results = dict(runs=runs, rows=rows, floor=floor, minutes=args.minutes, n=args.n)
    write_results(args.out, results, text)


def summarise(runs: list[dict]) -> dict:
    """Mean over seeds and half the range between them, for every score."""
    row = {"parameters": runs[0]["parameters"], "seeds": len(runs)}
    for key in SCORES:
        values = [r[key] for r in runs]
        row[key] = statistics.fmean(values)
        row[key + "_spread"] = (max(values) - min(values)) / 2
    return row


def table(rows: dict, floor: float, floor_n: int, args) -> str:
    peer = "diffusers" if "diffusers" in rows else next(iter(rows))
    lines = [
        f"| library | parameters | steps in {args.minutes:g} min | Frechet distance "
        f"(floor {floor:.1f}) | vs {peer} | clear digits |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ratio = r["frechet"] / rows[peer]["frechet"]
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.2f} M | {r['steps']:,.0f} "
            f"| {r['frechet']:.1f} ± {r['frechet_spread']:.1f} | {ratio:.2f}x "
            f"| {r['clear_share']:.1%} ± {r['clear_share_spread']:.1%} |"
        )
    return "\n".join(lines) + (
        f"\n\nMean over {args.seeds} seed(s) ± half the range between them; {args.n} samples per "
        f"seed, 1000-step DDPM from the same noise; {torch.get_num_threads()} torch thread(s); "
        f"floor: {floor_n} real test digits."
    )


if __name__ == "__main__":
    main()
