import json
import re
from pathlib import Path

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


def test_idx_dataset_needs_a_path(tmp_path):
    with pytest.raises(SystemExit, match="--idx-images"):
        main(["train", "--dataset", "idx", "--out", str(tmp_path)])


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
