"""The trainer: it learns, it resumes exactly, its GPU paths run, and it refuses bad settings."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddpm_lib import GaussianMixture, sample
from ddpm_lib.batches import BatchOrder
from ddpm_lib.checkpoint import list_checkpoints, load_checkpoint, model_from_checkpoint
from ddpm_lib.config import TrainConfig, default_config
from ddpm_lib.run_folder import RunFolderError
from ddpm_lib.training import NonFiniteLossError, Trainer


def quiet_trainer(config, **kwargs):
    return Trainer(config, progress=False, log=None, **kwargs)


@pytest.mark.slow
def test_a_2d_run_covers_every_mode_of_a_ring(tmp_path):
    # The data: 8 equal modes on a circle (std 0.05). Chance would put 12.5 % of samples on each.
    config = default_config("ring", out=str(tmp_path), checkpoint_every=0)  # 3000 steps of 1024
    summary = quiet_trainer(config).train()  # its wall time: benchmarks/ring_timing.py
    state = load_checkpoint(summary["checkpoint"])
    model, schedule = model_from_checkpoint(state)
    n = 4000
    x = sample(
        model,
        schedule,
        (n, 2),
        sampler="ddim",
        steps=100,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    ring = GaussianMixture.ring()
    distance = torch.cdist(x.double(), ring.means).min(dim=1)
    nearest = distance.indices
    shares = torch.bincount(nearest, minlength=8).double() / n
    # Every mode holds between 8 % and 17 % of samples (a share of 12.5 % has sd 0.5 % here).
    assert torch.all((shares > 0.08) & (shares < 0.17)), shares
    # and most samples sit on a mode: within 3 standard deviations of its centre (98.9 % of the
    # data do; 93 % of samples did when this test was written).
    assert (distance.values < 0.15).double().mean() > 0.85


def test_batch_order_is_a_function_of_the_step():
    order = BatchOrder(n=100, batch_size=32, seed=3)
    first = [order.indices(s) for s in range(9)]
    again = BatchOrder(n=100, batch_size=32, seed=3)
    assert all(torch.equal(again.indices(s), first[s]) for s in reversed(range(9)))
    epoch0 = torch.cat(first[:3])
    assert len(set(epoch0.tolist())) == 96  # 3 full batches per epoch, no repeats
    # Two processes split each global batch without overlap.
    ranks = [BatchOrder(100, 32, 3, rank=r, world_size=2).indices(4) for r in (0, 1)]
    assert sorted(torch.cat(ranks).tolist()) == sorted(first[4].tolist())


def test_resuming_gives_bit_identical_weights(tmp_path):
    base = dict(
        steps=12, batch_size=16, checkpoint_every=6, log_every=3, sample_n=4, sample_steps=2
    )
    straight = quiet_trainer(default_config("digits", out=str(tmp_path / "a"), **base))
    straight.train()
    first_half = quiet_trainer(default_config("digits", out=str(tmp_path / "b"), **base))
    first_half.config.steps = 6
    first_half.train()
    resumed = quiet_trainer(default_config("digits", out=str(tmp_path / "b"), **base), resume=True)
    assert resumed.step == 6
    resumed.train()
    for a, b in [(straight.model, resumed.model), (straight.ema.shadow, resumed.ema.shadow)]:
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), name
    opt_a, opt_b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    for k in opt_a["state"]:
        for key, value in opt_a["state"][k].items():
            assert torch.equal(value, opt_b["state"][k][key])


def test_run_folder_holds_config_log_checkpoints_and_samples(tmp_path):
    config = default_config(
        "digits",
        steps=8,
        batch_size=8,
        log_every=2,
        checkpoint_every=2,
        keep_checkpoints=2,
        sample_every=4,
        sample_n=4,
        sample_steps=2,
        out=str(tmp_path),
    )
    quiet_trainer(config).train()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["steps"] == 8 and saved["data"] == "digits"
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8]
    assert all(r["images_per_sec"] > 0 and r["loss"] > 0 for r in lines)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000006.pt", "ckpt_00000008.pt"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_00000004.png",
        "step_00000008.png",
    ]
    state = torch.load(tmp_path / "ckpt_00000008.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "lr_scheduler", "scaler", "rng", "config"} <= set(state)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(amp="bf16"),
        dict(amp="fp16"),
        dict(channels_last="on"),
        dict(amp="bf16", channels_last="on"),
    ],
    ids=["bf16", "fp16+scaler", "channels_last", "bf16+channels_last"],
)
def test_gpu_paths_run_on_cpu_when_forced(tmp_path, overrides):
    config = default_config(
        "digits", steps=3, batch_size=8, out=str(tmp_path), sample_n=2, sample_steps=2, **overrides
    )
    trainer = quiet_trainer(config)
    if overrides.get("amp") == "fp16":
        assert trainer.scaler.is_enabled()
    trainer.train()
    assert trainer.step == 3
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.slow
def test_torch_compile_path_trains(tmp_path):
    config = default_config(
        "moons", steps=3, batch_size=16, out=str(tmp_path), compile=True, sample_n=4, sample_steps=2
    )
    trainer = quiet_trainer(config)
    trainer.train()
    assert trainer.step == 3


def test_nan_loss_stops_training_and_writes_no_checkpoint(tmp_path):
    config = default_config("moons", steps=50, batch_size=16, out=str(tmp_path), checkpoint_every=1)
    trainer = quiet_trainer(config)
    trainer.train_step(*next(trainer._batches()))  # one good step
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))  # corrupt the network
    # The step that failed is step 2 of the metrics log (step 1 was the good one).
    with pytest.raises(NonFiniteLossError, match=r"step 2: the loss is nan.*lr=") as info:
        trainer.train()
    assert "fp16" not in str(info.value)  # AMP is off: no hint about fp16 overflow
    assert list_checkpoints(tmp_path) == []


def test_a_nan_gradient_is_caught_at_its_step(tmp_path):
    config = default_config("moons", steps=50, batch_size=16, out=str(tmp_path))
    trainer = quiet_trainer(config)
    batches = trainer._batches()
    for _ in range(3):
        trainer.train_step(*next(batches))
    weight = next(trainer.model.parameters())
    weight.register_hook(lambda grad: grad * float("nan"))  # the loss stays finite
    with pytest.raises(NonFiniteLossError, match=r"step 4: the gradient norm is nan"):
        trainer.train_step(*next(batches))
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        with torch.no_grad():
            weight.fill_(float("inf"))
        trainer.save()
    assert list_checkpoints(tmp_path) == []


def test_a_checkpoint_of_another_network_is_refused_on_resume(tmp_path):
    quiet_trainer(
        default_config("moons", steps=2, out=str(tmp_path), sample_n=2, sample_steps=2)
    ).train()
    other = default_config("moons", steps=4, out=str(tmp_path), model_config={"hidden": 64})
    with pytest.raises(RunFolderError, match=r"model_config \{\} -> \{'hidden': 64\}"):
        quiet_trainer(other, resume=True)


# Bad configuration: (option overrides, error type, the option the message must name)
BAD_CONFIGS = [
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=-3), ValueError, "steps"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(lr=-1e-3), ValueError, "lr"),
    (dict(ema_decay=1.0), ValueError, "ema_decay"),
    (dict(ema_decay=-0.1), ValueError, "ema_decay"),
    (dict(data="imagenet"), ValueError, "data"),
    (dict(amp="fp8"), ValueError, "amp"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(schedule="sigmoid"), ValueError, "schedule"),
    (dict(T=0), ValueError, "T"),
    (dict(sample_steps=5000), ValueError, "sample_steps"),
    (dict(keep_checkpoints=0), ValueError, "keep_checkpoints"),
    (dict(grad_clip=-1.0), ValueError, "grad_clip"),
    (dict(image_size=9), ValueError, "image_size"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(lr=float("inf")), ValueError, "lr"),
    (dict(grad_clip=float("inf")), ValueError, "grad_clip"),
    (dict(max_minutes=float("nan")), ValueError, "max_minutes"),
    (dict(data="folder"), ValueError, "data_root"),  # the image folder must be named
    (dict(T=10, sample_steps=20), ValueError, "sample_steps"),
]


@pytest.mark.parametrize(
    "overrides,error,name",
    BAD_CONFIGS,
    ids=[f"{next(iter(c[0]))}={next(iter(c[0].values()))}" for c in BAD_CONFIGS],
)
def test_bad_configuration_fails_before_training(tmp_path, overrides, error, name):
    values = dict(steps=5, out=str(tmp_path / "run"))
    values.update(overrides)
    with pytest.raises(error, match=rf"^{name}\b"):
        quiet_trainer(default_config(values.pop("data", "digits"), **values))
    assert not (tmp_path / "run").exists()


def test_output_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(ValueError, match=r"^out\b"):
        quiet_trainer(default_config("moons", out=str(tmp_path / "taken")))


def test_unknown_config_option_is_refused():
    with pytest.raises(ValueError, match="unknown config options"):
        TrainConfig.from_dict({"stepz": 3})


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port: a fixed one may be held by another test run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node=2",
            f"--master_port={port}",
            "-m",
            "ddpm_lib",
            "train",
            "--data",
            "moons",
            "--steps",
            "6",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--checkpoint-every",
            "3",
            "--sample-n",
            "8",
            "--sample-steps",
            "2",
            "--quiet",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(out / "ckpt_00000006.pt")
    assert state["world_size"] == 2 and state["step"] == 6
    model, schedule = model_from_checkpoint(state)
    x = sample(model, schedule, (16, 2), steps=5, progress=False)
    assert x.shape == (16, 2) and torch.isfinite(x).all()


def test_a_resumed_log_holds_each_step_once(tmp_path):
    kw = dict(batch_size=16, log_every=2, checkpoint_every=2, sample_n=2, sample_steps=2)
    quiet_trainer(default_config("moons", steps=4, out=str(tmp_path), **kw)).train()
    with (tmp_path / "metrics.jsonl").open("a") as f:  # what a run killed after step 4 left
        f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n")
    quiet_trainer(default_config("moons", steps=8, out=str(tmp_path), **kw), resume=True).train()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_saving_a_scatter_leaves_the_plotting_backend_alone(tmp_path):
    import matplotlib

    from ddpm_lib.figures import save_sample_figure

    before = matplotlib.get_backend()
    save_sample_figure(torch.randn(50, 2), tmp_path / "points.png")
    assert (tmp_path / "points.png").stat().st_size > 0
    assert matplotlib.get_backend() == before


def test_the_nan_message_suggests_fp16_only_when_fp16_is_on(tmp_path):
    config = default_config("moons", steps=5, batch_size=16, out=str(tmp_path), amp="fp16")
    trainer = quiet_trainer(config)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 1: the loss is nan.*fp16 overflow"):
        trainer.train()


def test_a_short_chain_samples_with_all_its_steps_unless_told_otherwise():
    assert default_config("moons", T=1).sample_steps == 1  # --T 1 alone is a valid run
    assert default_config("moons", T=20).sample_steps == 20
    assert default_config("moons").sample_steps == 50
    with pytest.raises(ValueError, match=r"^sample_steps must be an integer in \[1, T=1\]"):
        default_config("moons", T=1, sample_steps=5).validate()


def test_images_per_second_counts_the_images_a_step_really_sees(tmp_path, monkeypatch):
    import ddpm_lib.metrics_log as metrics_log

    # A clock that ticks one second per reading: whole-second windows, no rounding to blur them.
    ticks = iter(range(10**6))
    monkeypatch.setattr(metrics_log, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    config = default_config("moons", steps=4, batch_size=64, n_data=10, log_every=2,
                            sample_n=2, sample_steps=2, out=str(tmp_path))  # fmt: skip
    quiet_trainer(config).train()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for before, r in zip([{"elapsed_sec": 0}, *records], records):
        window = r["elapsed_sec"] - before["elapsed_sec"]
        # 10 points a step, not the batch size of 64: 2 steps x 10 in the window.
        assert r["images_per_sec"] == pytest.approx(2 * 10 / window, abs=0.05)


def test_a_run_too_short_to_log_gives_a_valid_json_summary(tmp_path):
    config = default_config("moons", steps=2, batch_size=16, log_every=50, sample_n=2,
                            sample_steps=2, out=str(tmp_path))  # fmt: skip
    summary = quiet_trainer(config).train()
    assert summary["last_logged_loss"] is None
    json.loads(json.dumps(summary, allow_nan=False))


def test_a_device_torch_does_not_have_is_refused_before_any_work(tmp_path, monkeypatch):
    import ddpm_lib.training as training

    monkeypatch.setattr(training, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match=r"^device='mps' was asked for, but torch sees no"):
            quiet_trainer(default_config("moons", device="mps", out=str(tmp_path)))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device='cuda' was asked for"):
            quiet_trainer(default_config("moons", device="cuda", out=str(tmp_path)))


def test_a_network_too_large_for_memory_is_refused_before_allocating_it(tmp_path, monkeypatch):
    import ddpm_lib.hardware as hardware
    import ddpm_lib.training as training

    monkeypatch.setattr(training, "build_model", lambda *a, **k: pytest.fail("allocated"))
    huge = {"base_channels": 4096, "channel_mult": [1, 2, 4, 8], "attention_resolutions": []}
    config = default_config("digits", out=str(tmp_path), model_config=huge)
    with pytest.raises(ValueError, match=r"^model_config: the unet network has [\d,]+ parameters"):
        quiet_trainer(config)
    # The estimate is weights, gradients, two Adam moments and the EMA copy at 4 bytes each.
    monkeypatch.setattr(hardware, "free_memory", lambda device: 1_000_000)
    with pytest.raises(ValueError, match=r"need about 0\.0 GB .* more than the 0\.0 GB free"):
        quiet_trainer(default_config("moons", out=str(tmp_path)))


def test_an_allocator_refusal_is_the_same_one_line_error(tmp_path, monkeypatch):
    import ddpm_lib.training as training

    def refuse(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 40000000000000 bytes. Error code 12"
        )

    monkeypatch.setattr(training, "build_model", refuse)
    with pytest.raises(ValueError, match=r"^model_config: the mlp network does not fit") as info:
        quiet_trainer(default_config("moons", out=str(tmp_path)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("weighting", [{}, {"min_snr_gamma": 5.0}, {"p2_gamma": 1.0}])
def test_the_trainer_loss_is_the_configured_weighting_of_algorithm_1(tmp_path, weighting):
    from ddpm_lib.diffusion import diffusion_loss

    config = default_config("moons", steps=1, out=str(tmp_path), **weighting)
    trainer = quiet_trainer(config)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    generator_state = trainer.noise_generator.get_state()
    ours = trainer.loss(x0, None)
    again = torch.Generator().set_state(generator_state)  # the same t and noise
    expected = diffusion_loss(trainer.model, trainer.schedule, x0, generator=again, **weighting)
    assert torch.allclose(ours, expected)


def test_the_two_loss_weightings_are_refused_together():
    with pytest.raises(ValueError, match="min_snr_gamma and p2_gamma"):
        default_config("moons", min_snr_gamma=5.0, p2_gamma=1.0).validate()
    with pytest.raises(ValueError, match=r"p2_gamma must be .*\[0, 1e\+06\]"):
        default_config("moons", p2_gamma=-1.0).validate()
