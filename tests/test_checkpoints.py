"""fit's checkpoints cannot lose work: a writable directory checked up front, the last
``keep_last`` kept, corrupt files skipped, a changed model refused, the history handed
over when training fails (issue 10)."""

import errno
import json
import math
import os
import re
import tempfile

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_fit import TinyEncoder, TinyVAE, binary_data, run

from lvmkit.inference.training import CHECKPOINT_NAME, HISTORY_NAME, CheckpointError, fit


def counting_model(calls):
    def model(x, labels=None):
        calls.append(1)
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    return model


def empty_guide(x, labels=None):
    pass


def saved_step(path):
    return torch.load(path, weights_only=False)["step"]


# -- writable before the first step ---------------------------------------------------------
def test_checkpoint_dir_under_a_file_fails_before_anything_runs(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    calls = []
    for directory in (blocker / "ckpt", blocker):
        with pytest.raises(OSError, match=re.escape(repr(str(directory)))
                           + " is not a writable directory"):
            fit(counting_model(calls), empty_guide, torch.ones(20), steps=2000,
                batch_size=10, checkpoint_dir=directory, progress=False)
    assert calls == []  # not even the first trace


def test_read_only_checkpoint_dir_fails_before_anything_runs(tmp_path, monkeypatch):
    """chmod binds no one when the tests run as root, so the refusal to create a file is
    simulated where fit asks for it."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, read_only):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    calls = []
    with pytest.raises(PermissionError, match="ro' is not a writable directory") as info:
        fit(counting_model(calls), empty_guide, torch.ones(20), steps=2000, batch_size=10,
            checkpoint_dir=read_only, progress=False)
    assert info.value.errno == errno.EACCES
    assert calls == [] and os.listdir(read_only) == []


# -- keep_last --------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_last, expected", [
    (3, {CHECKPOINT_NAME: 10, "checkpoint-8.pt": 8, "checkpoint-6.pt": 6}),
    (2, {CHECKPOINT_NAME: 10, "checkpoint-8.pt": 8}),
    (1, {CHECKPOINT_NAME: 10}),
])
def test_keep_last_checkpoints(tmp_path, keep_last, expected):
    run(10, binary_data(), checkpoint_dir=tmp_path, checkpoint_every=2, keep_last=keep_last)
    assert sorted(os.listdir(tmp_path)) == sorted(expected)
    assert {name: saved_step(tmp_path / name) for name in expected} == expected


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be a positive int, got 0"):
        run(2, binary_data(), checkpoint_dir=tmp_path, keep_last=0)


def test_resume_false_replaces_the_old_runs_checkpoints(tmp_path):
    run(8, binary_data(), checkpoint_dir=tmp_path, checkpoint_every=2)
    pyro.clear_param_store()
    run(4, binary_data(), checkpoint_dir=tmp_path, checkpoint_every=2, resume=False)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2.pt", CHECKPOINT_NAME]
    assert saved_step(tmp_path / CHECKPOINT_NAME) == 4


# -- corrupt checkpoints -------------------------------------------------------------------------
def corrupt(path, how):
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2],
                      "random": bytes(torch.randint(0, 256, (len(raw),)).tolist()),
                      "empty": b""}[how])


@pytest.mark.parametrize("how", ["truncated", "random", "empty"])
def test_corrupt_newest_checkpoint_resumes_from_the_previous(tmp_path, how):
    data = binary_data()
    full = run(12, data)
    pyro.clear_param_store()
    run(6, data, checkpoint_dir=tmp_path, checkpoint_every=2)
    corrupt(tmp_path / CHECKPOINT_NAME, how)
    pyro.clear_param_store()
    newest = re.escape(str(tmp_path / CHECKPOINT_NAME))
    previous = re.escape(str(tmp_path / "checkpoint-4.pt"))
    with pytest.warns(RuntimeWarning, match=f"{newest} .* cannot be read; resuming from the "
                                            f"previous one, {previous} \\(step 4\\).*kept as "
                                            f"\\['{newest}\\.unreadable'\\]"):
        resumed = run(12, data, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert resumed.step == list(range(1, 13))
    assert resumed.loss == pytest.approx(full.loss, abs=1e-6)
    # the unreadable file set aside, not deleted
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10.pt", CHECKPOINT_NAME,
                                            CHECKPOINT_NAME + ".unreadable"]
    assert saved_step(tmp_path / CHECKPOINT_NAME) == 12


def test_no_readable_checkpoint_names_every_file(tmp_path):
    run(4, binary_data(), checkpoint_dir=tmp_path, checkpoint_every=2)
    corrupt(tmp_path / CHECKPOINT_NAME, "empty")
    corrupt(tmp_path / "checkpoint-2.pt", "random")
    pyro.clear_param_store()
    with pytest.raises(CheckpointError) as info:
        run(8, binary_data(), checkpoint_dir=tmp_path, checkpoint_every=2)
    message = str(info.value)
    assert str(tmp_path / CHECKPOINT_NAME) in message
    assert str(tmp_path / "checkpoint-2.pt") in message
    assert "resume=False" in message


# -- a changed model -------------------------------------------------------------------------------
def train_vae(tmp_path, steps, latent=2, decoder_name="decoder"):
    torch.manual_seed(1)
    vae, guide = TinyVAE(latent=latent), TinyEncoder(latent=latent)

    def model(x, labels=None):
        pyro.module(decoder_name, vae.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=vae.decoder(z)).to_event(1), obs=x)

    return fit(model, guide, binary_data(), steps=steps, batch_size=10, progress=False,
               checkpoint_dir=tmp_path)


def test_resume_refuses_other_parameter_shapes(tmp_path):
    train_vae(tmp_path, 2, latent=20)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=re.escape(
            "other shapes: decoder$$$0.weight (8, 20) in the checkpoint vs (8, 30) here")):
        train_vae(tmp_path, 4, latent=30)


def test_resume_refuses_other_parameter_names(tmp_path):
    train_vae(tmp_path, 2)
    pyro.clear_param_store()
    with pytest.raises(ValueError) as info:
        train_vae(tmp_path, 4, decoder_name="generator")
    message = str(info.value)
    assert "in the checkpoint but not in this model: ['decoder$$$0.bias'" in message
    assert "in this model but not in the checkpoint: ['generator$$$0.bias'" in message


# -- the history reaches the caller ------------------------------------------------------
def test_history_is_on_the_exception_and_beside_the_checkpoints(tmp_path):
    calls = []

    def model(x, labels=None):
        counting_model(calls)(x)
        if len(calls) == 4:  # call 1 is the first trace: this is step 3
            raise RuntimeError("the model broke")

    with pytest.raises(RuntimeError, match="the model broke") as info:
        fit(model, empty_guide, torch.ones(20), steps=10, batch_size=10, progress=False,
            checkpoint_dir=tmp_path, checkpoint_every=5)
    history = info.value.history
    assert history.step == [1, 2] and all(math.isfinite(v) for v in history.loss)
    saved = json.loads((tmp_path / HISTORY_NAME).read_text())
    assert saved["step"] == [1, 2] and saved["loss"] == history.loss
    assert any("History of the 2 steps" in note for note in info.value.__notes__)


@pytest.mark.filterwarnings("ignore:Encountered \\+inf")
def test_history_is_on_a_non_finite_loss_error_without_checkpoints():
    calls = []

    def model(x, labels=None):
        counting_model(calls)(x)
        if len(calls) == 3:
            pyro.factor("broken", torch.tensor(float("inf")))

    with pytest.raises(FloatingPointError, match="at step 2") as info:
        fit(model, empty_guide, torch.ones(20), steps=10, batch_size=10, progress=False)
    assert info.value.history.step == [1]


def test_resume_ignores_saved_parameters_this_model_does_not_use(tmp_path):
    """The store is global: a checkpoint also holds what another model left in it."""
    data = binary_data()
    full = run(8, data)
    pyro.clear_param_store()
    pyro.param("another_models_weight", torch.zeros(3))
    run(4, data, checkpoint_dir=tmp_path, checkpoint_every=4)
    pyro.clear_param_store()  # as in a new process
    resumed = run(8, data, checkpoint_dir=tmp_path)
    assert resumed.loss == pytest.approx(full.loss, abs=1e-6)
