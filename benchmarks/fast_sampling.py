"""How long 500 digits take with few steps: DPM-Solver++(2M) against DDIM, and against diffusers.

The book's cached digits U-Net (cpu profile) draws 500 digits with ddpm_lib's
``sample(..., sampler="dpm++2m", steps=10)``, with 50-step DDIM (the fewest DDIM steps that came
within 10 % of 1000-step DDPM before this sampler existed), and, when diffusers is installed, with
diffusers' ``DPMSolverMultistepScheduler`` driving the same network over the same timesteps (its
loop, our network: the ratio is the cost of the sampler code). Each is timed ``--repeats`` times;
the table gives the median wall-clock seconds.

    python benchmarks/fast_sampling.py --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
from results_files import write_results

from ddpm_lib import lambda_spaced_timesteps, sample
from ddpm_lib.profiles import digits_run, profile

N = 500


def diffusers_dpm_solver(model, schedule, steps: int, generator: torch.Generator) -> torch.Tensor:
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.T, trained_betas=schedule.betas.tolist(),
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
    )  # fmt: skip
    scheduler.set_timesteps(timesteps=lambda_spaced_timesteps(schedule, steps)[::-1])
    x = torch.randn((N, 1, 8, 8), generator=generator)
    with torch.inference_mode():
        for t in scheduler.timesteps:
            eps = model(x, torch.full((N,), int(t), dtype=torch.long))
            x = scheduler.step(eps, t, x).prev_sample
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = profile("cpu")
    model, schedule, _ = p.load_or_train(*digits_run(p), progress=False)
    runs = {
        "ddpm_lib, DPM-Solver++(2M), 10 steps": lambda g: sample(
            model, schedule, (N, 1, 8, 8), sampler="dpm++2m", steps=10, generator=g,
            progress=False,
        ),
        "ddpm_lib, DPM-Solver++(2M), 8 steps": lambda g: sample(
            model, schedule, (N, 1, 8, 8), sampler="dpm++2m", steps=8, generator=g,
            progress=False,
        ),
        "ddpm_lib, DDIM, 50 steps": lambda g: sample(
            model, schedule, (N, 1, 8, 8), sampler="ddim", steps=50, generator=g, progress=False
        ),
    }  # fmt: skip
    if importlib.util.find_spec("diffusers") is not None:
        runs["diffusers' DPMSolverMultistepScheduler, 10 steps, same network"] = lambda g: (
            diffusers_dpm_solver(model, schedule, 10, g)
        )
    seconds = {}
    for name, run in runs.items():
        times = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            run(torch.Generator().manual_seed(repeat))
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
        print(f"{name}: {seconds[name]:.2f} s", flush=True)
    ours = seconds["ddpm_lib, DPM-Solver++(2M), 10 steps"]
    lines = [
        f"| {N} digits | median seconds | / DPM-Solver++(2M) 10 steps |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s:.2f} | {s / ours:.2f} |" for name, s in seconds.items()]
    text = "\n".join(lines) + (
        f"\n\nMedian of {args.repeats} runs; {torch.get_num_threads()} torch thread(s); "
        "the cpu profile's digits U-Net (0.76 M weights)."
    )
    print("\n" + text)
    write_results("fast_sampling", seconds, text)


if __name__ == "__main__":
    main()
