"""The book's profile switch and its train-once cache."""

import pytest

from ddpm_lib.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from ddpm_lib.profiles import Profile, default_profile, profile
from ddpm_lib.training import default_config


def test_pick_follows_the_profile():
    assert Profile("smoke").pick(smoke=1, cpu=2, gpu=3) == 1
    assert Profile("cpu").pick(smoke=1, cpu=2, gpu=3) == 2
    assert Profile("gpu").pick(smoke=1, cpu=2, gpu=3) == 3


def test_the_environment_chooses_the_profile(monkeypatch):
    monkeypatch.setenv("DDPM_PROFILE", "smoke")
    assert default_profile() == "smoke" and profile().name == "smoke"
    monkeypatch.setenv("DDPM_PROFILE", "fast")
    with pytest.raises(ValueError, match="^DDPM_PROFILE must be one of"):
        default_profile()
    with pytest.raises(ValueError, match="^profile must be one of"):
        Profile("huge")
    assert "ddpm_lib" in Profile("cpu").describe()


def test_load_or_train_trains_once_then_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    P = Profile("smoke")
    config = default_config("moons", steps=3, batch_size=16, sample_n=2, sample_steps=2)
    messages = []
    model, schedule, state = P.load_or_train("toy", config, progress=False, log=messages.append)
    assert state["step"] == 3 and schedule.T == 1000
    assert not any("loaded the cached run" in m for m in messages)
    again, _, state2 = P.load_or_train("toy", config, progress=False, log=messages.append)
    assert "loaded the cached run 'toy'" in messages[-1]
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert (p == q).all(), name
    # Another config under the same name trains afresh instead of loading a stale network.
    other = default_config("moons", steps=4, batch_size=16, sample_n=2, sample_steps=2)
    _, _, state3 = P.load_or_train("toy", other, progress=False, log=messages.append)
    assert state3["step"] == 4 and state3["config"]["steps"] == 4


def test_load_or_train_resumes_an_unfinished_run_and_replaces_a_broken_one(tmp_path, monkeypatch):
    from ddpm_lib.checkpoint import checkpoint_path
    from ddpm_lib.training import Trainer

    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    P = Profile("smoke")
    config = default_config("moons", steps=4, batch_size=16, sample_n=2, sample_steps=2,
                            checkpoint_every=2)  # fmt: skip
    folder = P.run_folder("toy")

    class Unplugged(Trainer):  # the kernel died after step 3 of 4
        def train_step(self, x0):  # the unconditional signature: chapter 8 overrides it so
            loss = super().train_step(x0)
            if self.step == 3:
                raise KeyboardInterrupt
            return loss

    unfinished = default_config(**{**config.to_dict(), "out": str(folder)})
    with pytest.raises(KeyboardInterrupt):
        Unplugged(unfinished, progress=False, log=None).train()
    messages = []
    _, _, state = P.load_or_train("toy", config, progress=False, log=messages.append)
    assert state["step"] == 4 and f"resuming from {checkpoint_path(folder, 2)}" in messages[0]

    # Checkpoints that no longer load, and a config.json of another run: trained afresh.
    for path in folder.glob("ckpt_*.pt"):
        path.write_bytes(b"damaged")
    (folder / "config.json").write_text('{"data": "ring", "lr": 1.0}')
    messages.clear()
    _, _, state = P.load_or_train("toy", config, progress=False, log=messages.append)
    assert state["step"] == 4 and messages[0].startswith("overwrite: removed config.json")


def test_a_cached_run_from_before_a_new_option_still_loads(tmp_path, monkeypatch):
    # A run saved before TrainConfig had some option (here class_dropout, added for chapter 9)
    # was trained with that option's default: it must load, not be deleted and retrained.
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    P = Profile("smoke")
    config = default_config("moons", steps=2, batch_size=16, sample_n=2, sample_steps=2)
    P.load_or_train("toy", config, progress=False, log=lambda m: None)
    for path in list_checkpoints(P.run_folder("toy")):
        state = load_checkpoint(path)
        del state["config"]["class_dropout"]
        save_checkpoint(state, path)
    messages = []
    P.load_or_train("toy", config, progress=False, log=messages.append)
    assert messages and "loaded the cached run 'toy'" in messages[-1]


def test_two_kernels_asking_for_one_run_at_once_train_it_once(tmp_path, monkeypatch):
    """Chapters run in parallel (nbval under pytest-xdist) ask for the same cached run at once:
    the second waits while the first trains (no "in use by another training" error), then loads
    it. The second asks from a thread here; the lock is a flock, which threads hold apart too."""
    import threading

    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    P = Profile("smoke")
    config = default_config("moons", steps=3, batch_size=16, sample_n=2, sample_steps=2)
    second, waited = {}, []

    def ask_again():
        messages = []
        second["state"] = P.load_or_train("toy", config, progress=False, log=messages.append)[2]
        second["messages"] = messages

    other = threading.Thread(target=ask_again)

    def log(message):  # the first run says "training ..." once it holds the run folder
        if message.startswith("training") and not other.is_alive():
            other.start()
            other.join(timeout=1.0)
            waited.append(other.is_alive())  # still waiting for this run to finish

    _, _, state = P.load_or_train("toy", config, progress=False, log=log)
    other.join(timeout=60)
    assert waited == [True] and not other.is_alive()
    assert "loaded the cached run 'toy'" in second["messages"][-1], second["messages"]
    assert second["state"]["step"] == state["step"] == 3
