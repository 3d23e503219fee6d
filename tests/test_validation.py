import pytest
import torch

import lvmkit
from lvmkit._validation import check_observations


def test_accepts_valid_batch():
    check_observations(torch.rand(5, 4), event_shape=(4,), support="unit")
    check_observations(torch.bernoulli(torch.rand(5, 4)), event_shape=(4,), support="binary")


@pytest.mark.parametrize(
    "x, kwargs, match",
    [
        (torch.rand(5, 3), {"event_shape": (4,)}, r"site 'x'.*\(batch, 4\).*\(5, 3\)"),
        (torch.rand(4), {"event_shape": (4,)}, r"\(batch, 4\), got \(4,\)"),
        (torch.tensor([[0.5, float("nan")]]), {}, r"non-finite value nan at index \[0, 1\]"),
        (torch.tensor([[0.5, 1.5]]), {"support": "unit"}, r"value 1.5 at index \[0, 1\].*\[0, 1\]"),
        (torch.tensor([[0.5, 1.0]]), {"support": "binary"}, r"value 0.5 .*\{0, 1\}"),
    ],
)
def test_rejects_bad_batches_naming_site(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_observations(x, **kwargs)


def test_a_passed_batch_is_checked_again_after_in_place_changes_or_other_rules():
    x = torch.rand(3, 4)
    check_observations(x, event_shape=(4,), support="unit")
    check_observations(x, event_shape=(4,), support="unit")  # remembered: no new scan
    with pytest.raises(ValueError, match=r"\(batch, 2, 2\)"):
        check_observations(x, event_shape=(2, 2))
    check_observations(x, event_shape=(4,), support="unit")
    with pytest.raises(ValueError, match="outside"):
        check_observations(x, event_shape=(4,), support="binary")
    x[1, 2] = float("nan")  # bumps the version counter
    with pytest.raises(ValueError, match=r"non-finite value nan at index \[1, 2\]"):
        check_observations(x, event_shape=(4,), support="unit")


def test_rejects_non_tensor_and_integer_data():
    with pytest.raises(TypeError, match="site 'pixels'"):
        check_observations([[0.0, 1.0]], site="pixels")
    with pytest.raises(TypeError, match="floating-point"):
        check_observations(torch.ones(2, 2, dtype=torch.long))


def test_lazy_namespace_and_unknown_names():
    assert "inference" in dir(lvmkit)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lvmkit.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lvmkit.models.nope  # noqa: B018
