"""Checkpoints written before a change still load, sample and resume.

``tests/data/format1_run`` holds a tiny run (moons, a 1-block MLP, T = 50, 4 steps of 16, seed 0,
on the CPU) written by ddpm_lib 0.1.0 at commit 107bdab (format ``ddpm_lib/1``), before the
trainer was split into modules: its ``config.json`` and the checkpoints of steps 2 and 4.
"""

import json
import shutil
from pathlib import Path

import torch

from ddpm_lib import load_checkpoint, model_from_checkpoint, sample
from ddpm_lib.checkpoint import checkpoint_path, list_checkpoints
from ddpm_lib.cli import main
from ddpm_lib.config import TrainConfig
from ddpm_lib.training import Trainer

RUN = Path(__file__).parent / "data" / "format1_run"


def test_an_old_checkpoint_loads_and_samples():
    state = load_checkpoint(RUN / "ckpt_00000004.pt")
    assert state["format"] == "ddpm_lib/1" and state["version"] == "0.1.0"
    assert state["step"] == 4 and state["model_name"] == "mlp"
    model, schedule = model_from_checkpoint(state)
    assert schedule.T == 50 and model.config["hidden"] == 16
    x = sample(model, schedule, (8, 2), steps=5, progress=False)
    assert x.shape == (8, 2) and torch.isfinite(x).all()


def test_ddpm_info_reads_an_old_checkpoint(capsys):
    assert main(["info", str(RUN / "ckpt_00000002.pt")]) == 0
    assert "step         2" in capsys.readouterr().out


def test_an_old_run_resumes_to_the_weights_the_old_code_reached(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "ckpt_00000002.pt"):
        shutil.copy(RUN / name, run / name)
    values = json.loads((RUN / "config.json").read_text())
    config = TrainConfig.from_dict({**values, "out": str(run)})
    trainer = Trainer(config, resume=True, progress=False, log=None)
    assert trainer.step == 2
    trainer.train()
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    new = load_checkpoint(checkpoint_path(run, 4))
    old = load_checkpoint(RUN / "ckpt_00000004.pt")
    # The same data order, noise and optimiser steps: equal up to the CPU's float rounding.
    for key in ("model", "ema"):
        a = old[key] if key == "model" else old[key]["shadow"]
        b = new[key] if key == "model" else new[key]["shadow"]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), (key, name)
    assert new["optimizer"]["state"].keys() == old["optimizer"]["state"].keys()
