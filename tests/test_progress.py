"""lvmkit._progress: tqdm in terminals and notebooks, plain lines elsewhere."""

import io

import pytest

from lvmkit._progress import LineProgress, progress_bar, track


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_lines_every_five_percent_with_postfix_and_timing():
    out = io.StringIO()
    bar = progress_bar(200, desc="fit", stream=out)
    assert isinstance(bar, LineProgress)  # a StringIO is not a terminal
    for step in range(200):
        bar.update(1)
        bar.set_postfix(loss=f"{step:.4g}", refresh=False)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20  # 5%, 10%, ..., 100%; close adds nothing after 100%
    assert lines[0].startswith("fit: 10/200 (5%) loss=9 [")
    assert lines[-1].startswith("fit: 200/200 (100%) loss=199 [")
    assert "it/s" in lines[0] and "ETA" in lines[0] and "ETA" not in lines[-1]
    assert "\r" not in out.getvalue()


def test_resumed_and_interrupted_runs():
    out = io.StringIO()
    bar = progress_bar(100, initial=50, desc="fit", stream=out)
    for _ in range(12):
        bar.update(1)
    bar.close()  # stopped at 62: the last line says where
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" ")[1] for line in lines] == ["55/100", "60/100", "62/100"]


def test_a_terminal_gets_a_tqdm_bar_and_the_environment_overrides(monkeypatch):
    from tqdm import tqdm

    bar = progress_bar(10, stream=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv("LVMKIT_PROGRESS", "lines")
    assert isinstance(progress_bar(10, stream=Terminal()), LineProgress)
    monkeypatch.setenv("LVMKIT_PROGRESS", "bar")
    bar = progress_bar(10, stream=io.StringIO())
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv("LVMKIT_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="LVMKIT_PROGRESS.*'fancy'"):
        progress_bar(10)


def test_track_and_small_totals():
    out = io.StringIO()
    assert list(track(range(3), desc="eval", stream=out)) == [0, 1, 2]
    # with 3 steps every step crosses a 5% mark
    assert [line.split(" ")[1] for line in out.getvalue().splitlines()] == ["1/3", "2/3", "3/3"]
    out = io.StringIO()
    LineProgress(0, stream=out).close()
    assert out.getvalue().startswith("0/0 [")


@pytest.mark.parametrize("kwargs", [{"total": -1}, {"total": 5, "initial": -1},
                                    {"total": 2.5}, {"total": 5, "every": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        LineProgress(**kwargs)


def test_log_likelihood_reports_lines_when_stderr_is_not_a_terminal(capsys):
    import torch

    from lvmkit.inference import log_likelihood
    from lvmkit.models import build

    model, guide = build("vae", 4, z_dim=2, hidden=(3,))
    x = torch.bernoulli(torch.full((30, 4), 0.5))
    log_likelihood(model, guide, x, num_samples=2, batch_size=10, progress=True)
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    assert err.splitlines()[-1].startswith("log_likelihood: 3/3 (100%)")
    assert "\r" not in err
