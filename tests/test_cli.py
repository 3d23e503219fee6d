import json
import re
from pathlib import Path

import numpy as np
import pytest

from lvmkit.cli import ELBO_NAMES, build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_train_then_evaluate_writes_a_complete_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "vae", "--steps", "4", "--batch-size", "20"]
    assert main([*argv, "--eval-samples", "3", "--out", str(out), "--no-progress"]) == 0
    for name in ("run.json", "weights.pt", "history.json", "metrics.json", "loss.png",
                 "reconstructions.png", "samples.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["test_log_likelihood"] < 0
    # the IWAE bound with K=3 is at least the single-sample ELBO up to noise; both finite
    assert metrics["test_log_likelihood"] > metrics["test_elbo"] - 5
    assert "| vae | trace | 4 |" in capsys.readouterr().out

    assert main(["evaluate", "--run", str(out), "--num-samples", "20", "--limit", "10",
                 "--no-progress"]) == 0
    result = json.loads((out / "evaluate_test.json").read_text())
    assert result["points"] == 10 and result["num_samples"] == 20
    assert result["log_likelihood_mean"] < 0
    assert "IWAE, K=20, 10 points" in capsys.readouterr().out


def test_evaluate_reloads_the_trained_weights(tmp_path):
    """Evaluating a saved run twice with one seed gives the same number (weights reloaded)."""
    out = tmp_path / "run"
    main(["train", "--model", "sbn-linear", "--elbo", "tracegraph", "--steps", "3",
          "--eval-samples", "2", "--out", str(out), "--no-progress"])
    values = []
    for _ in range(2):
        main(["evaluate", "--run", str(out), "--num-samples", "5", "--limit", "5",
              "--no-progress"])
        values.append(json.loads((out / "evaluate_test.json").read_text())["log_likelihood_mean"])
    assert values[0] == values[1]
    # weights trained on 8x8 digits do not fit 28x28 images: a message, not a traceback
    with pytest.raises(SystemExit, match="do not fit dataset 'mnist5k'"):
        main(["evaluate", "--run", str(out), "--dataset", "mnist5k", "--num-samples", "2",
              "--no-progress"])


@pytest.mark.parametrize("command", ["train", "evaluate", "compare", "demo"])
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices.items()
               if a[0] == command)[1]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
            assert action.option_strings[0] in text


def test_unknown_choices_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert "rebar" in ELBO_NAMES


def usage_error(argv, capsys) -> str:
    """Run ``main(argv)``, expect argparse's usage error (exit 2) and return stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2, (argv, captured.err)
    assert "Traceback" not in captured.err
    return captured.err


@pytest.fixture
def fake_run(tmp_path) -> str:
    """A folder that passes --run's check (evaluate's other options fail before it is read)."""
    for name in ("run.json", "weights.pt"):
        (tmp_path / name).write_text("{}")
    return str(tmp_path)


BAD_VALUES = [
    ("train", "--steps", "-5"),
    ("train", "--steps", "0"),
    ("train", "--steps", "1.5"),
    ("train", "--batch-size", "0"),
    ("train", "--lr", "-1"),
    ("train", "--lr", "0"),
    ("train", "--lr", "nan"),
    ("train", "--lr", "inf"),
    ("train", "--lr", "fast"),
    ("train", "--num-particles", "0"),
    ("train", "--eval-samples", "0"),
    ("train", "--seed", "-1"),
    ("train", "--seed", str(2**32)),
    ("train", "--threads", "0"),
    ("evaluate", "--num-samples", "0"),
    ("evaluate", "--chunk-size", "-3"),
    ("evaluate", "--limit", "0"),
    ("evaluate", "--seed", "-2"),
    ("evaluate", "--threads", "0"),
    ("compare", "--estimators", "rebar,foo"),
    ("compare", "--estimators", "rebar,,nvil"),
    ("compare", "--estimators", "rebar,rebar"),
    ("compare", "--steps", "0"),
    ("compare", "--batch-size", "-24"),
    ("compare", "--lr", "-0.1"),
    ("compare", "--seed", "x"),
    ("compare", "--threads", "-1"),
    ("demo", "--steps", "-1"),
    ("demo", "--eval-samples", "0"),
    ("demo", "--batch-size", "0"),
    ("demo", "--lr", "-1e-3"),
    ("demo", "--seed", "-1"),
    ("demo", "--threads", "0"),
]


@pytest.mark.parametrize("command, option, value", BAD_VALUES)
def test_bad_values_are_usage_errors_naming_the_option(command, option, value, fake_run,
                                                       tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"  # the default --out folders are relative to it
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    extra = ["--run", fake_run] if command == "evaluate" else []
    err = usage_error([command, *extra, f"{option}={value}"], capsys)
    assert f"argument {option}:" in err and repr(value) in err, err
    assert not list(cwd.iterdir())  # refused before anything is written


def test_estimator_list_parses_into_names():
    args = build_parser().parse_args(["compare", "--estimators", "rebar, nvil,arm"])
    assert args.estimators == ["rebar", "nvil", "arm"]
    assert build_parser().parse_args(["compare"]).estimators is None


def test_every_typed_option_has_a_bad_value_test():
    """No option is a bare int or float, and each checked one is exercised in BAD_VALUES."""
    checked = {(command, option) for command, option, _ in BAD_VALUES}
    paths = {"--idx-images", "--idx-labels", "--run"}  # tested below
    choices = build_parser()._subparsers._group_actions[0].choices
    for command, sub in choices.items():
        for action in sub._actions:
            assert action.type not in (int, float), (command, action.option_strings)
            if action.type is not None and action.option_strings[0] not in paths:
                assert (command, action.option_strings[0]) in checked, (command, action.dest)


def test_version(capsys):
    import lvmkit

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"lvmkit {lvmkit.__version__}\n"
    pyproject = (README.parent / "pyproject.toml").read_text()
    declared = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.M).group(1)
    assert lvmkit.__version__ == declared


def test_idx_dataset_needs_both_paths(tmp_path, capsys):
    err = usage_error(["train", "--dataset", "idx", "--out", str(tmp_path)], capsys)
    assert "--idx-images" in err and "--idx-labels" in err
    (tmp_path / "img.idx").write_bytes(b"")
    err = usage_error(["train", "--dataset", "idx", "--idx-images", str(tmp_path / "img.idx")],
                      capsys)
    assert "--idx-labels" in err
    err = usage_error(["train", "--dataset", "idx", "--idx-images", str(tmp_path / "none.idx")],
                      capsys)
    assert "argument --idx-images" in err and "none.idx" in err
    err = usage_error(["compare", "--idx-images", str(tmp_path / "img.idx")], capsys)
    assert "need --dataset idx" in err


def test_evaluate_needs_a_trained_run(tmp_path, capsys):
    err = usage_error(["evaluate", "--run", str(tmp_path)], capsys)
    assert "argument --run" in err and "run.json" in err


def test_batch_size_larger_than_the_data_is_a_usage_error(tmp_path, capsys):
    err = usage_error(["train", "--batch-size", "5000", "--out", str(tmp_path)], capsys)
    assert "argument --batch-size: 5000 exceeds the 1438 images" in err
    assert not (tmp_path / "run.json").exists()


def test_readme_example_runs(monkeypatch):
    """The README's ten-line example runs as written (with fewer steps)."""
    block = re.search(r"## Your own model.*?```python\n(.*?)```", README.read_text(), re.S)
    code = block.group(1)
    assert "steps=2000" in code
    code = code.replace("steps=2000", "steps=3").replace("num_samples=1000", "num_samples=10")
    printed = []
    namespace = {"print": lambda *a: printed.append(a)}
    exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["history"].loss) == 3
    assert float(printed[0][0]) < 0
    # the shape the comment promises is the shape the code gets
    comment = re.search(r"^x = load_dataset\(.*#\s*\((\d+), (\d+)\)", code, re.M)
    assert comment, "the README example's x = load_dataset(...) line lost its shape comment"
    assert tuple(namespace["x"].shape) == (int(comment.group(1)), int(comment.group(2)))


def test_compare_builds_nvil_on_the_others_gradient_scale(tmp_path, monkeypatch, capsys):
    """`--estimators nvil` must compare NVIL without its variance normalisation, as
    compare_estimators' default line-up does (that rescales its score term)."""
    import lvmkit.inference

    seen = {}

    def fake_compare(model, data, estimators, **kwargs):
        seen.update(estimators)
        return {"estimators": {}}

    monkeypatch.setattr(lvmkit.inference, "compare_estimators", fake_compare, raising=False)
    assert main(["compare", "--estimators", "nvil,rebar", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    assert seen["nvil"].normalize is False and type(seen["rebar"]).__name__ == "RebarELBO"


def test_train_and_evaluate_on_idx_files(tmp_path, capsys):
    """An IDX run evaluates with its files named again (run.json does not keep the paths)."""
    from test_data import write_idx

    rng = np.random.default_rng(0)
    write_idx(tmp_path / "img.idx", rng.integers(0, 256, (40, 3, 3), dtype=np.uint8), 0x08)
    write_idx(tmp_path / "lab.idx", np.arange(40, dtype=np.uint8) % 2, 0x08)
    files = ["--dataset", "idx", "--idx-images", str(tmp_path / "img.idx"),
             "--idx-labels", str(tmp_path / "lab.idx")]
    out = str(tmp_path / "run")
    assert main(["train", "--steps", "2", "--batch-size", "8", "--eval-samples", "2",
                 "--out", out, "--no-progress", *files]) == 0
    with pytest.raises(SystemExit, match="lvmkit: dataset 'idx' needs the paths .*--idx-images"):
        main(["evaluate", "--run", out, "--num-samples", "2", "--no-progress"])
    capsys.readouterr()
    assert main(["evaluate", "--run", out, "--num-samples", "2", "--no-progress",
                 *files[2:]]) == 0
    assert "vae on idx/test: log p(x) >= " in capsys.readouterr().out
    digits_run = tmp_path / "digits-run"  # evaluate refuses the files before reading weights
    digits_run.mkdir()
    (digits_run / "run.json").write_text(json.dumps({"dataset": "digits", "binarize": "static"}))
    (digits_run / "weights.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="are for dataset 'idx', not 'digits'"):
        main(["evaluate", "--run", str(digits_run), "--no-progress", *files[2:]])


def test_a_failed_train_leaves_the_folders_previous_run_whole(tmp_path, capsys):
    """Regressions (found by a review): a train that failed (here: a refused resume) had
    already rewritten run.json, so evaluate scored the old weights under the new settings;
    and the failure was a traceback. Now run.json is written with the weights, and the
    error is one line."""
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    base = ["train", "--model", "vae", "--eval-samples", "2", "--out", str(out),
            "--checkpoint-dir", str(ckpt), "--no-progress"]
    assert main([*base, "--steps", "3", "--batch-size", "20"]) == 0
    before = json.loads((out / "run.json").read_text())
    with pytest.raises(SystemExit, match="lvmkit train: .*batch_size=20"):
        main([*base, "--steps", "6", "--batch-size", "10"])
    assert json.loads((out / "run.json").read_text()) == before
    # a folder option naming a file is a usage error naming the option
    (tmp_path / "afile").write_text("")
    err = usage_error(["train", "--out", str(tmp_path / "afile")], capsys)
    assert "argument --out:" in err and "is a file, not a folder" in err
