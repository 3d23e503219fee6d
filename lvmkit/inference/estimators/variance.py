"""One tracker of an estimator's gradient variance, for every estimator's diagnostics.

The reference REBAR code (tensorflow/models, research/rebar) reports the log of the
exponential moving average (decay 0.999) of the per-coordinate gradient variance,
averaged over coordinates. :class:`GradientVariance` keeps those moving moments in place
(a few fused ops per step) and reads the log variance out on demand.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["GradientVariance"]


class GradientVariance:
    """Debiased exponential moving mean and mean square of a list of gradient tensors.

    :param decay: decay of the moving averages (the reference code's 0.999).

    Example:

    >>> import math
    >>> import torch
    >>> tracker = GradientVariance(decay=0.99)
    >>> _ = torch.manual_seed(0)
    >>> for _ in range(2000):  # gradients of variance 4 in each of 3 coordinates
    ...     tracker.update([2 * torch.randn(3)])
    >>> abs(tracker.log_variance() - math.log(4)) < 0.1
    True
    """

    def __init__(self, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.steps = 0

    def update(self, grads: Iterable[torch.Tensor]) -> None:
        """Add one gradient estimate (the tensors of one step, always in the same order);
        other shapes than before start the statistics afresh."""
        grads = [g.detach() for g in grads]
        if not grads:
            return
        shapes = [g.shape for g in grads]
        if self.moments is None or [m.shape for m, _ in self.moments] != shapes:
            self.moments = [(torch.zeros_like(g), torch.zeros_like(g)) for g in grads]
            self.steps = 0
        elif (self.moments[0][0].dtype, self.moments[0][0].device) != (grads[0].dtype,
                                                                       grads[0].device):
            # the same parameters, moved: so are their statistics
            self.moments = [(m.to(g), s.to(g)) for (m, s), g in zip(self.moments, grads,
                                                                     strict=True)]
        weight = 1 - self.decay
        with torch.no_grad():
            means = [m for m, _ in self.moments]
            squares = [s for _, s in self.moments]
            torch._foreach_lerp_(means, grads, weight)
            torch._foreach_mul_(squares, self.decay)
            torch._foreach_addcmul_(squares, grads, grads, value=weight)
        self.steps += 1

    def log_variance(self) -> float | None:
        """Log of the debiased per-coordinate variance averaged over coordinates; ``None``
        before two updates."""
        if self.moments is None or self.steps < 2:
            return None
        correction = 1 - self.decay**self.steps
        variance = torch.cat([
            (s / correction - (m / correction) ** 2).clamp_min(0).reshape(-1)
            for m, s in self.moments
        ])
        return float(variance.mean().clamp_min(1e-30).log())

    def state_dict(self) -> dict:
        """The moments and the step count, for checkpoints."""
        return {
            "moments": None if self.moments is None
            else [(m.clone(), s.clone()) for m, s in self.moments],
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`."""
        moments = state["moments"]
        self.moments = None if moments is None else [(m.clone(), s.clone()) for m, s in moments]
        self.steps = int(state["steps"])
