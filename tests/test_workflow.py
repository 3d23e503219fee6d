"""Tests of the library code behind the CLI: the estimator registry, atomic_save and
lvmkit.workflow."""

import json
import os

import pyro
import pytest
import torch

from lvmkit._io import atomic_save, atomic_write_bytes
from lvmkit.data import load_dataset
from lvmkit.inference.registry import ESTIMATOR_NAMES, ESTIMATORS, make_estimator
from lvmkit.workflow import (
    check_run_dir,
    evaluate_run,
    fixed_batch,
    format_evaluation,
    format_table,
    load_run,
    load_run_data,
    train_and_evaluate,
    train_several,
)

# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ESTIMATOR_NAMES)
def test_every_registered_estimator_builds(name):
    elbo = make_estimator(name, num_particles=3)
    assert type(elbo).__name__ == ESTIMATORS[name].cls
    assert elbo.num_particles == 3


def test_registry_raises_vimco_to_two_particles_and_passes_kwargs():
    assert make_estimator("vimco").num_particles == 2
    assert make_estimator("nvil", normalize=False).normalize is False
    # NVIL's default is the unbiased one; the paper's normalisation is its own entry
    assert make_estimator("nvil").normalize is False
    assert make_estimator("nvil-norm").normalize is True
    # compared variances need NVIL on the others' scale; an explicit argument still wins
    assert make_estimator("nvil", comparable=True).normalize is False
    assert make_estimator("nvil", comparable=True, normalize=True).normalize is True


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_registry_refuses_bad_particle_counts(bad):
    with pytest.raises(ValueError, match="num_particles must be a positive int"):
        make_estimator("trace", num_particles=bad)


def test_registry_refuses_unknown_names_listing_the_valid_ones():
    with pytest.raises(ValueError, match="unknown estimator 'rebr'.*rebar"):
        make_estimator("rebr")


def test_cli_offers_exactly_the_registered_estimators():
    from lvmkit.cli import ELBO_NAMES

    assert ELBO_NAMES == ESTIMATOR_NAMES


# --------------------------------------------------------------------------- atomic_save


def test_atomic_save_writes_a_loadable_file_and_creates_the_folder(tmp_path):
    path = tmp_path / "new" / "state.pt"
    atomic_save({"a": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.arange(3))
    assert os.listdir(path.parent) == ["state.pt"]  # no temporary file left


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"version": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails, whatever its type
        atomic_save({"version": 2, "bad": lambda: None}, path)
    assert torch.load(path) == {"version": 1}
    assert os.listdir(tmp_path) == ["state.pt"]


def test_atomic_write_bytes_and_before_replace(tmp_path):
    path = tmp_path / "history.json"
    path.write_bytes(b"old")
    seen = []

    def keep_previous():  # runs once the new file is complete, before the rename
        seen.append(path.read_bytes())
        (tmp_path / "previous.json").write_bytes(path.read_bytes())

    atomic_write_bytes(b'{"loss": [1.0]}', path, prefix=".checkpoint-",
                       before_replace=keep_previous)
    assert seen == [b"old"] and path.read_bytes() == b'{"loss": [1.0]}'
    assert sorted(os.listdir(tmp_path)) == ["history.json", "previous.json"]
    with pytest.raises(TypeError, match="data must be bytes, got str"):
        atomic_write_bytes("text", path)

    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save({"a": 1}, path, before_replace=fail)
    assert path.read_bytes() == b'{"loss": [1.0]}'  # the old file stands, no temporary left
    assert sorted(os.listdir(tmp_path)) == ["history.json", "previous.json"]


# --------------------------------------------------------------------------- workflow


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train"), load_dataset("digits", split="test")


def test_train_and_evaluate_without_out_writes_nothing(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, test = digits
    result = train_and_evaluate(
        "vae", train, test, steps=3, batch_size=20, eval_samples=2, eval_points=7,
        progress=False,
    )
    assert not list(tmp_path.iterdir()) and result.files == {}
    assert len(result.history.loss) == 3
    assert result.metrics["test_points"] == 7 and result.metrics["num_samples"] == 2
    assert result.metrics["train_elbo"] == pytest.approx(-result.history.loss[-1])
    assert isinstance(result.guide, torch.nn.Module)


def test_train_and_evaluate_is_reproducible_and_its_run_reloads(digits, tmp_path):
    train, test = digits
    kwargs = dict(estimator="tracegraph", steps=3, batch_size=20, eval_samples=3,
                  eval_points=5, progress=False, model_kwargs={"layers": (20,)})
    first = train_and_evaluate("sbn-linear", train, test, out=tmp_path / "a", **kwargs)
    second = train_and_evaluate("sbn-linear", train, test, out=tmp_path / "b", **kwargs)
    assert first.metrics["test_log_likelihood"] == second.metrics["test_log_likelihood"]
    for kind, path in first.files.items():
        assert path.stat().st_size > 0, kind
    assert {"run", "weights", "history", "metrics", "loss", "reconstructions",
            "samples"} <= set(first.files)
    run = json.loads(first.files["run"].read_text())
    assert run["model_kwargs"] == {"layers": [20]} and run["elbo"] == "tracegraph"

    # the reloaded guide gives the trained guide's parameters
    trained = {k: v.clone() for k, v in first.guide.state_dict().items()}
    second_state = {k: v.clone() for k, v in second.guide.state_dict().items()}
    _, model, guide = load_run(tmp_path / "a", train.x.shape[1])
    for key, value in guide.state_dict().items():
        assert torch.equal(value, trained[key]) and torch.equal(value, second_state[key])

    one = evaluate_run(tmp_path / "a", test, num_samples=4, limit=6, seed=1)
    two = evaluate_run(tmp_path / "a", test, num_samples=4, limit=6, seed=1)
    assert one == two and one["points"] == 6 and one["log_likelihood_mean"] < 0
    assert json.loads((tmp_path / "a" / "evaluate_test.json").read_text()) == one
    assert "| sbn-linear | tracegraph | 3 |" in format_table([first.metrics])


def test_a_batch_larger_than_the_data_is_refused_before_the_run_folder_is_begun(digits,
                                                                              tmp_path):
    train, test = digits
    with pytest.raises(ValueError, match=r"batch_size=5000 exceeds the 1438 images of "
                                         r"train_set \(digits\)"):
        train_and_evaluate("vae", train, test, steps=1, batch_size=5000, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_load_run_refuses_weights_of_other_data(digits, tmp_path):
    train, test = digits
    train_and_evaluate("vae", train, test, steps=1, batch_size=20, eval_samples=1,
                       eval_points=2, progress=False, out=tmp_path,
                       model_kwargs={"z_dim": 2, "hidden": (8,)})
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="do not fit dataset 'other' \\(100 pixels"):
        load_run(tmp_path, 100, "other")


def test_run_data_defaults_to_the_runs_dataset_and_refuses_what_does_not_fit(tmp_path):
    train = load_dataset("digits", split="train", binarize=None)
    with pytest.raises(ValueError, match="is not a run folder .* \\(no run.json\\)"):
        load_run_data(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(ValueError, match="\\(no weights.pt\\)"):
        check_run_dir(tmp_path)
    train_and_evaluate("vae", train, train, steps=1, batch_size=20, eval_samples=1,
                       eval_points=2, progress=False, out=tmp_path,
                       model_kwargs={"z_dim": 2, "hidden": (8,)})
    assert check_run_dir(str(tmp_path)) == tmp_path
    test = load_run_data(tmp_path)  # the run's grey digits, not the default binarization
    assert (test.name, test.binarize, len(test)) == ("digits", None, 359)
    assert not torch.isin(test.x, torch.tensor([0.0, 1.0])).all()
    assert load_run_data(tmp_path, "train", binarize="static").binarize == "static"
    with pytest.raises(ValueError, match="are for dataset 'idx', not 'digits'"):
        load_run_data(tmp_path, images=tmp_path / "run.json")
    with pytest.raises(ValueError, match="dataset 'idx' needs the paths .* does not keep them"):
        load_run_data(tmp_path, dataset="idx", labels=tmp_path / "run.json")
    result = evaluate_run(tmp_path, test, num_samples=2, limit=3)
    assert (result["model"], result["dataset"], result["split"]) == ("vae", "digits", "test")
    assert format_evaluation(result).startswith("vae on digits/test: log p(x) >= ")
    assert "(IWAE, K=2, 3 points)" in format_evaluation(result)


def test_fixed_batch_is_the_first_points_binarized_once(digits):
    dynamic = load_dataset("digits", split="test", binarize="dynamic")
    a, b = fixed_batch(dynamic, 5, seed=3), fixed_batch(dynamic, 5, seed=3)
    assert a.shape == (5, 64) and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert fixed_batch(digits[1], None, 0).shape[0] == len(digits[1])


def test_train_several_writes_one_folder_per_job_and_the_tables(digits, tmp_path):
    train, test = digits
    lines = []
    results = train_several(
        [("vae", "trace"), ("vae", "tracegraph")], train, test, tmp_path, log=lines.append,
        steps=2, batch_size=20, eval_samples=2, eval_points=4, progress=False,
        model_kwargs={"z_dim": 2, "hidden": (8,)},
    )
    assert [r.metrics["elbo_estimator"] for r in results] == ["trace", "tracegraph"]
    assert (tmp_path / "vae-trace" / "metrics.json").exists()  # a repeated model: by estimator
    assert (tmp_path / "vae-tracegraph" / "weights.pt").exists()
    assert json.loads((tmp_path / "results.json").read_text()) == [r.metrics for r in results]
    assert "| vae | tracegraph | 2 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert lines == ["== training vae with trace for 2 steps on digits",
                     "== training vae with tracegraph for 2 steps on digits"]
    with pytest.raises(ValueError, match="non-empty list of"):
        train_several([], train, test, tmp_path)
    with pytest.raises(TypeError, match=r"sets \['estimator'\] itself"):
        train_several([("vae", "trace")], train, test, tmp_path, estimator="rebar")


def test_cli_demo_runs_through_train_several(tmp_path, capsys):
    from lvmkit.cli import main

    assert main(["demo", "--steps", "2", "--batch-size", "50", "--eval-samples", "2",
                 "--sbn-elbo", "tracegraph", "--out", str(tmp_path), "--no-progress"]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"vae", "sbn-nonlinear", "results.md",
                                                   "results.json", "loss_curves.png"}
    assert "| sbn-nonlinear | tracegraph | 2 |" in capsys.readouterr().out
