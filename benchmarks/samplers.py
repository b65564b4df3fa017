"""Sample quality against the number of sampling steps, in the manner of DDIM's Table 1.

The samplers share one trained network: DDPM with the small (posterior) and the large (beta)
variance, respaced to fewer steps as in Nichol & Dhariwal; DDIM with eta = 0 (deterministic),
spaced uniformly in t and in lambda (half the log signal-to-noise ratio); and two solvers of the
probability-flow ODE, DPM-Solver++(2M) (one network call per step; spaced in lambda, in t, and
with diffusers' first-order last step) and Heun's method (two calls per step but the last). Each
runs at 5, 10, 20 and 50 steps, DDPM and DDIM also at 1000, on two problems:

- the 8x8 digits with the book's cached digits U-Net (``profiles.digits_run``): the Frechet
  distance to the training digits in the digits classifier's feature space (lower is better),
  with the real test digits' distance to the same training digits as the floor, and the share of
  samples the classifier names with confidence >= 0.9;
- the 8-mode ring with its exact noise predictor (``GaussianMixture.eps_oracle``): the sliced
  Wasserstein distance to fresh data (the network error is zero, so only the sampler matters),
  with the data-versus-data distance as the baseline.

    python benchmarks/samplers.py                    # cpu profile model, writes benchmarks/results/
    python benchmarks/samplers.py --profile smoke    # seconds, for a quick check of the script

Each cell is the mean over ``--seeds`` independent sample sets, ± half the range between them,
and the wall-clock milliseconds per sample on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch
from results_files import RESULTS, write_results

from ddpm_lib import (
    GaussianMixture,
    judge_digits,
    load_dataset,
    load_digits_classifier,
    ode_solvers,
    sample,
)
from ddpm_lib.classifier import digits_features
from ddpm_lib.metrics import frechet_distance, sliced_wasserstein
from ddpm_lib.profiles import digits_run, profile
from ddpm_lib.schedule import NoiseSchedule

FEW = (5, 10, 20, 50)
ALL = (*FEW, 1000)
# name: (sample() options, steps to run)
SAMPLERS = {
    "DDPM, small variance": (dict(sampler="ddpm", variance="small"), ALL),
    "DDPM, large variance": (dict(sampler="ddpm", variance="large"), FEW),
    "DDIM, eta = 0": (dict(sampler="ddim"), ALL),
    "DDIM, eta = 0, lambda spacing": (dict(sampler="ddim", spacing="lambda"), FEW),
    "DPM-Solver++(2M)": (dict(sampler="dpm++2m"), FEW),
    "DPM-Solver++(2M), uniform in t": (dict(sampler="dpm++2m", spacing="uniform"), FEW),
    "DPM-Solver++(2M), first-order last step": (dict(sampler="dpm++2m", lower_order_final=15), FEW),
    "Heun (2 x steps - 1 calls)": (dict(sampler="heun"), FEW),
}
STEPS = ALL
REFERENCE = ("DDPM, small variance", 1000)  # the sampler of Ho et al.: the quality to match


@contextlib.contextmanager
def lower_order_final(below: int | None):
    """diffusers' rule for DPM-Solver++: a first-order step into t = 0 below ``below`` steps."""
    saved = ode_solvers.LOWER_ORDER_FINAL_BELOW
    ode_solvers.LOWER_ORDER_FINAL_BELOW = saved if below is None else below
    try:
        yield
    finally:
        ode_solvers.LOWER_ORDER_FINAL_BELOW = saved


def sweep(model, schedule, shape, score, seeds: int, label: str) -> dict:
    """Every sampler at each of its step counts: {sampler: {steps: {"score", "spread", ...}}}."""
    table = {}
    for name, (options, step_counts) in SAMPLERS.items():
        options = dict(options)
        below = options.pop("lower_order_final", None)
        table[name] = {}
        for steps in step_counts:
            scores, seconds = [], 0.0
            for seed in range(seeds):
                generator = torch.Generator().manual_seed(seed)
                start = time.perf_counter()
                with lower_order_final(below):
                    x = sample(model, schedule, shape, steps=steps, generator=generator,
                               progress=False, **options)  # fmt: skip
                seconds += time.perf_counter() - start
                scores.append(score(x.cpu(), seed))
            table[name][str(steps)] = {
                "score": statistics.fmean(s["score"] for s in scores),
                "spread": (max(s["score"] for s in scores) - min(s["score"] for s in scores)) / 2,
                "ms_per_sample": 1000 * seconds / (seeds * shape[0]),
                **{k: statistics.fmean(s[k] for s in scores) for k in scores[0] if k != "score"},
            }
            print(
                f"{label:7s} {name:42s} {steps:5d} steps: {table[name][str(steps)]['score']:.4f}",
                flush=True,
            )
    return table


def fewest_steps_within(table: dict, sampler: str, tolerance: float = 0.10) -> int | None:
    """Fewest steps at which ``sampler`` scores within ``tolerance`` of the reference (lower is
    better), or None."""
    target = (1 + tolerance) * table[REFERENCE[0]][str(REFERENCE[1])]["score"]
    return next((int(s) for s, cell in table[sampler].items() if cell["score"] <= target), None)


def digits_benchmark(p, n: int, seeds: int) -> dict:
    model, schedule, state = p.load_or_train(*digits_run(p), progress=True)
    classifier = load_digits_classifier()
    train = load_dataset("digits", split="train").tensors[0]
    test = load_dataset("digits", split="test").tensors[0]
    train_features = digits_features(train, classifier)

    def score(x, seed):
        return {
            "score": frechet_distance(digits_features(x, classifier), train_features),
            "clear_share": judge_digits(x.clamp(-1, 1), classifier)["confident_share"],
        }

    floor = frechet_distance(digits_features(test[:n], classifier), train_features)
    table = sweep(model, schedule, (n, 1, 8, 8), score, seeds, "digits")
    return dict(
        table=table,
        floor=floor,
        floor_label=f"{min(n, len(test))} real test digits vs the {len(train)} training digits",
        n=n,
        model_steps=state["step"],
        metric="Frechet distance to the training digits (classifier features)",
    )


def mixture_benchmark(n: int, seeds: int) -> dict:
    schedule = NoiseSchedule.linear()
    ring = GaussianMixture.ring()
    oracle = ring.eps_oracle(schedule)
    references = [
        ring.sample(n, generator=torch.Generator().manual_seed(1000 + s)) for s in range(seeds)
    ]

    def score(x, seed):
        return {
            "score": sliced_wasserstein(
                x, references[seed], generator=torch.Generator().manual_seed(seed)
            )
        }

    baseline = statistics.fmean(
        sliced_wasserstein(
            ring.sample(n, generator=torch.Generator().manual_seed(2000 + s)),
            references[s],
            generator=torch.Generator().manual_seed(s),
        )
        for s in range(seeds)
    )
    table = sweep(oracle, schedule, (n, 2), score, seeds, "ring")
    return dict(
        table=table,
        floor=baseline,
        floor_label=f"two independent sets of {n} ring points",
        n=n,
        metric="sliced Wasserstein distance to fresh ring data (exact oracle)",
    )


def milliseconds(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.2g}"


def markdown_table(result: dict, title: str) -> str:
    digits = 1 if result["floor"] > 1 else 3  # decimals worth printing
    header = "| Sampler | " + " | ".join(f"{s} steps" for s in STEPS) + " | within 10 % from |"
    lines = [
        f"**{title}**: {result['metric']}, {result['n']} samples; lower is better; in "
        "brackets, milliseconds per sample.",
        "",
        header,
        "|---" * (len(STEPS) + 2) + "|",
    ]
    for name, row in result["table"].items():
        cells = (
            f"{row[str(s)]['score']:.{digits}f} ± {row[str(s)]['spread']:.{digits}f} "
            f"({milliseconds(row[str(s)]['ms_per_sample'])})"
            if str(s) in row
            else ""
            for s in STEPS
        )
        fewest = fewest_steps_within(result["table"], name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fewest or '-'} |")
    lines += [
        "",
        f'Floor: {result["floor"]:.{digits}f} ({result["floor_label"]}). "Within 10 % from": '
        "the fewest steps whose distance is at most 1.1 times 1000-step DDPM's.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=("smoke", "cpu", "gpu"))
    parser.add_argument("--digits", type=int, default=500, help="digit samples per set")
    parser.add_argument("--points", type=int, default=4000, help="ring points per set")
    parser.add_argument("--seeds", type=int, default=2, help="independent sample sets per cell")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite samplers.md from samplers.json"
    )
    args = parser.parse_args()
    if args.table_only:
        results = json.loads((RESULTS / "samplers.json").read_text())
        write_tables(results)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    p = profile(args.profile)
    start = time.perf_counter()
    results = {
        "digits": digits_benchmark(p, args.digits, args.seeds),
        "ring": mixture_benchmark(args.points, args.seeds),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), {p.device}",
        "profile": p.name,
        "seeds": args.seeds,
    }
    results["seconds"] = time.perf_counter() - start
    write_tables(results)


def write_tables(results: dict) -> None:
    """Print the two tables and, unless this was a smoke run, write them to RESULTS."""
    text = "\n\n".join(
        [
            markdown_table(results["digits"], "Digits (cached U-Net)"),
            markdown_table(results["ring"], "8-mode ring (exact noise predictor)"),
            f"Mean of {results['seeds']} sample sets per cell; {results['machine']}; "
            f"profile {results['profile']}; {results['seconds'] / 60:.1f} minutes in all.",
        ]
    )
    print("\n" + text)
    if results["profile"] != "smoke":  # smoke runs are checks of the script, not results
        write_results("samplers", results, text)
        print(f"written to {RESULTS}/samplers.json and samplers.md")


if __name__ == "__main__":
    main()
