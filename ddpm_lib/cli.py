"""The ``ddpm`` command line: ``ddpm train``, ``ddpm sample``, ``ddpm bpd``, ``ddpm info``.

Every ``TrainConfig`` field is an option of ``ddpm train`` (``--batch-size 64``); options not given
keep the data set's defaults. Mistakes end with one line on stderr and a non-zero exit, never a
traceback. Explained in chapter 8 (scaling up).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path

import torch

from ddpm_lib._checks import check_choice, check_int, check_real
from ddpm_lib._version import __version__
from ddpm_lib.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from ddpm_lib.classifier import format_judgement, judge_digits, load_digits_classifier
from ddpm_lib.config import TrainConfig, default_config, option_help, option_type
from ddpm_lib.data import dataset_info, load_dataset
from ddpm_lib.figures import FIGURE_FORMATS, save_sample_figure
from ddpm_lib.guidance import num_classes_of
from ddpm_lib.hardware import pick_device
from ddpm_lib.metrics import variational_bound
from ddpm_lib.models import count_parameters
from ddpm_lib.run_folder import RunFolderError
from ddpm_lib.samplers import SAMPLERS, SPACINGS, VARIANCES, sample
from ddpm_lib.schedule import NoiseSchedule
from ddpm_lib.training import NonFiniteLossError, Trainer, TrainingInterrupted


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=option_help(f.name))
        kind = option_type(f.name)
        if kind is dict:
            parser.add_argument(flag, type=_json_dict, metavar="JSON", **kwargs)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=kind, metavar=kind.__name__.upper(), **kwargs)


def _network_options(batch_size: int, items: str) -> argparse.ArgumentParser:
    """The parent parser of the commands that run a checkpoint's network (sample, bpd)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--checkpoint", required=True, help="a ckpt_*.pt file")
    parent.add_argument("--no-ema", action="store_true", help="use raw instead of EMA weights")
    parent.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parent.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parent.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"{items} per forward pass"
    )
    return parent


def _load_network(
    args: argparse.Namespace,
) -> tuple[dict, torch.nn.Module, NoiseSchedule, torch.device]:
    """The checkpoint, and its network (EMA weights unless --no-ema) and schedule on --device."""
    device = pick_device(args.device)
    state = load_checkpoint(args.checkpoint)
    model, schedule = model_from_checkpoint(state, use_ema=not args.no_ema, path=args.checkpoint)
    return state, model.to(device), schedule.to(device), device


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"base_channels\": 64}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ddpm",
        description="Train and sample Denoising Diffusion Probabilistic Models (ddpm_lib).",
    )
    parser.add_argument("--version", action="version", version=f"ddpm_lib {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model",
        description="Train a noise predictor with Ho et al.'s Algorithm 1. Options not given "
        "take the defaults of the chosen data set. Multi-GPU: torchrun --nproc_per_node=N "
        "-m ddpm_lib train ...",
    )
    _add_train_options(train)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest valid checkpoint, with its config.json "
        "(only --steps, logging, sampling, checkpoint and hardware options may change)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run that --out holds (config.json, metrics.jsonl, checkpoints, sample "
        "grids) and start afresh",
    )
    train.add_argument(
        "--conditional",
        action="store_true",
        help="train a class-conditional network with the default label dropout (--class-dropout "
        "0.1): sample it with --class and --guidance (chapter 9)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    sample = commands.add_parser(
        "sample",
        help="sample a trained model",
        description="Generate samples from a checkpoint.",
        parents=[_network_options(1000, "samples")],
    )
    sample.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("--sampler", default="ddim", help="ddim (default), ddpm, dpm++2m or heun")
    sample.add_argument("--steps", type=int, default=None, help="sampling steps (default: all T)")
    sample.add_argument("--spacing", help="uniform (in t) or lambda (log-SNR); default: by sampler")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM noise, >= 0 (default 0)")
    sample.add_argument("--variance", default="small", help="DDPM variance: small or large")
    sample.add_argument("--no-clip", action="store_true", help="do not clip predicted x0")
    sample.add_argument(
        "--out", default="samples.png", help="image grid or scatter plot (.png, .jpg, .pdf, ...)"
    )
    sample.add_argument("--save-tensor", default=None, help="also save the samples as a .pt file")
    sample.add_argument(
        "--class",
        dest="label",
        type=int,
        default=None,
        help="conditional models: the class to sample (default: unconditional)",
    )
    sample.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance scale w >= 0 with --class: 0 ignores the class, 1 plain "
        "conditional (default), more guides harder",
    )
    sample.add_argument(
        "--judge", action="store_true", help="digits only: report the digits classifier's verdict"
    )

    bpd = commands.add_parser(
        "bpd",
        help="bits per dimension (the variational bound) of a data split",
        description="Ho et al.'s variational bound on -log p(x_0), in bits per dimension, of the "
        "data set the checkpoint was trained on: T network calls per example (chapter 7).",
        parents=[_network_options(500, "examples")],
    )
    bpd.add_argument("--split", default="test", help="test (default) or train")
    bpd.add_argument("--n", type=int, default=None, help="use the first n examples (default all)")
    bpd.add_argument("--variance", default="small", help="reverse variance: small or large")
    bpd.add_argument("--save-terms", default=None, help="save every term (N x T) as a .pt file")

    info = commands.add_parser("info", help="describe a checkpoint")
    info.add_argument("checkpoint", help="a ckpt_*.pt file")
    return parser


def _train(args: argparse.Namespace) -> int:
    flags = ("command", "resume", "overwrite", "quiet", "conditional")
    options = {k: v for k, v in vars(args).items() if k not in flags}
    if args.conditional:
        options.setdefault("class_dropout", 0.1)
    out = Path(options.get("out") or f"runs/{options.get('data', 'digits')}")
    saved = out / "config.json"
    if args.resume and saved.is_file():  # the run's own settings, with the options given on top
        try:
            values = json.loads(saved.read_text())
            model_config = {**values.get("model_config", {}), **options.pop("model_config", {})}
            values.update(options, out=str(out), model_config=model_config)
            config = TrainConfig.from_dict(values)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{saved}: not a readable run config ({e})") from None
    else:
        config = default_config(options.pop("data", "digits"), **options)
    trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    print(json.dumps(trainer.train()))
    return 0


def _check_outputs(inputs: list[str], **outputs: str | None) -> None:
    """Refuse an output file that is one of the inputs, or another output, or whose folder is
    missing: before any work, not after it."""
    seen = {Path(i).resolve(): "the input" for i in inputs}
    for name, value in outputs.items():
        if value is None:
            continue
        path = Path(value)
        if path.resolve() in seen:
            raise ValueError(f"{name} {value} is {seen[path.resolve()]}: choose another file")
        if path.is_dir():
            raise ValueError(f"{name} must be a file name, but {value} is a folder")
        if name != "out" and not path.parent.is_dir():  # --out's folder is created
            raise ValueError(f"{name}: the folder {path.parent} does not exist")
        seen[path.resolve()] = f"also --{name.replace('_', '-')}"


def _sample(args: argparse.Namespace) -> int:
    check_int("n", args.n, low=1)
    check_int("batch_size", args.batch_size, low=1)
    check_choice("sampler", args.sampler, SAMPLERS)
    check_choice("variance", args.variance, VARIANCES)
    if args.spacing is not None:
        check_choice("spacing", args.spacing, SPACINGS)
    check_real("eta", args.eta, low=0)
    if args.eta != 0 and args.sampler != "ddim":
        raise ValueError("eta applies to sampler='ddim' only: the others add no DDIM noise")
    check_real("guidance", args.guidance, low=0)
    if args.guidance != 1 and args.label is None:
        raise ValueError("--guidance needs --class (the class to guide towards)")
    out = Path(args.out)
    if out.suffix.lower() not in FIGURE_FORMATS:
        raise ValueError(
            f"out must end in one of {', '.join(FIGURE_FORMATS)} (the image format), got {out}"
        )
    _check_outputs([args.checkpoint], out=args.out, save_tensor=args.save_tensor)
    state, model, schedule, device = _load_network(args)
    item_shape = model.item_shape
    if args.judge and (state["config"]["data"] != "digits" or item_shape != (1, 8, 8)):
        raise ValueError(
            f"judge applies to 8x8 digits only, but {args.checkpoint} was trained on "
            f"{state['config']['data']} ({'x'.join(map(str, item_shape))})"
        )
    classes = num_classes_of(model)
    if args.label is not None:
        if classes is None:
            raise ValueError(
                f"--class needs a conditional model, but {args.checkpoint} is unconditional "
                "(trained without --class-dropout / --conditional)"
            )
        check_int("class", args.label, low=0, high=classes - 1)
    generator = torch.Generator(device).manual_seed(args.seed)
    chunks = []
    for start in range(0, args.n, args.batch_size):
        n = min(args.batch_size, args.n - start)
        chunks.append(
            sample(
                model,
                schedule,
                (n, *item_shape),
                sampler=args.sampler,
                steps=args.steps,
                spacing=args.spacing,
                eta=args.eta,
                variance=args.variance,
                clip_x0=not args.no_clip,
                generator=generator,
                device=device,
                progress=sys.stderr.isatty(),
                labels=None if args.label is None else torch.full((n,), args.label),
                guidance_scale=args.guidance,
            ).cpu()
        )
    x = torch.cat(chunks)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_sample_figure(x, out)
    print(f"wrote {len(x)} samples to {out}")
    if args.save_tensor:
        torch.save(x, args.save_tensor)
        print(f"wrote the tensor to {args.save_tensor}")
    if args.judge:
        labels = None if args.label is None else torch.full((len(x),), args.label)
        print(format_judgement(judge_digits(x, load_digits_classifier(), labels=labels)))
    return 0


def _bpd(args: argparse.Namespace) -> int:
    split = check_choice("split", args.split, ("train", "test"))
    if args.n is not None:
        check_int("n", args.n, low=1)
    check_int("batch_size", args.batch_size, low=1)
    check_choice("variance", args.variance, ("small", "large"))
    _check_outputs([args.checkpoint], save_terms=args.save_terms)
    state, model, schedule, device = _load_network(args)
    config = state["config"]
    levels = dataset_info(config["data"])["levels"]
    data = load_dataset(
        config["data"],
        root=config.get("data_root"),
        split=split,
        image_size=config.get("image_size"),
        n=args.n,
        generator=torch.Generator().manual_seed(args.seed + 1),  # toy sets: fresh points
    )
    x0 = (
        data.tensors[0]
        if hasattr(data, "tensors")
        else torch.stack([data[i][0] for i in range(len(data))])
    )
    if levels is not None:  # resized images fall between levels: score their 8-bit rounding
        x0 = ((x0 + 1) / 2 * (levels - 1)).round() / (levels - 1) * 2 - 1
    bound = variational_bound(
        model,
        schedule,
        x0.to(device),
        levels=levels,
        variance=args.variance,
        batch_size=args.batch_size,
        generator=torch.Generator(device).manual_seed(args.seed),
        progress=sys.stderr.isatty(),
    )
    summary = {"split": split, "levels": levels, **bound.summary()}
    print(json.dumps(summary))
    if args.save_terms:
        torch.save({"prior": bound.prior, "terms": bound.terms, "mse": bound.mse}, args.save_terms)
        print(f"wrote the terms to {args.save_terms}")
    return 0


def _info(args: argparse.Namespace) -> int:
    state = load_checkpoint(args.checkpoint)
    model, schedule = model_from_checkpoint(state, path=args.checkpoint)
    path = Path(args.checkpoint)
    size_mb = path.stat().st_size / 1e6
    lines = [
        f"checkpoint   {path} ({size_mb:.1f} MB, ddpm_lib {state.get('version')})",
        f"step         {state['step']}",
        f"data         {state['config'].get('data')}",
        f"network      {state['model_name']}, {count_parameters(model):,} parameters",
        f"model config {json.dumps(state['model_config'])}",
        f"classes      {_describe_classes(state)}",
        f"schedule     {schedule!r}",
    ]
    metrics = path.parent / "metrics.jsonl"
    if metrics.is_file():
        last = [line for line in metrics.read_text().splitlines() if line.strip()][-1:]
        if last:
            lines.append(f"last metrics {last[0]}")
    lines.append(f"config       {json.dumps(state['config'])}")
    print("\n".join(lines))
    return 0


def _describe_classes(state: dict) -> str:
    classes = state["model_config"].get("num_classes")
    if classes is None:
        return "unconditional"
    dropout = state["config"].get("class_dropout")
    return (
        f"conditional, {classes} classes (0-{classes - 1}; label dropout {dropout}): "
        "ddpm sample --class K --guidance W"
    )


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside training (which handles it itself): stop with a line, not silently."""


def _terminate(signal_number, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    run = {"train": _train, "sample": _sample, "bpd": _bpd, "info": _info}[args.command]
    expected = (ValueError, TypeError, OSError, CheckpointError, RunFolderError)
    expected += (NonFiniteLossError, FloatingPointError)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return run(args)
    except expected as e:
        print(f"ddpm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # the step under way was finished and checkpointed
        print(f"ddpm {args.command}: {e}", file=sys.stderr)
        return 128 + e.signal_number
    except _Terminated:
        print(f"ddpm {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
