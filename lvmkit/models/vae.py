"""The Gaussian VAE, and the base class shared by the Bernoulli-pixel image models."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from lvmkit._validation import check_observations
from lvmkit.nn import check_size, check_unsupervised, mlp


def bernoulli_pixels(logits: torch.Tensor) -> dist.Distribution:
    """The likelihood of a flattened image with pixel logits ``(..., D)``.

    Built without argument validation so that grey levels in [0, 1] (the ``"unit"``
    support that :func:`check_observations` admits) score as a cross-entropy.

    Example:

    >>> import torch
    >>> from lvmkit.models.vae import bernoulli_pixels
    >>> likelihood = bernoulli_pixels(torch.zeros(2, 3))
    >>> likelihood.log_prob(torch.tensor([[0.0, 1.0, 1.0], [0.5, 0.5, 0.5]]))
    tensor([-2.0794, -2.0794])
    """
    return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)


class BernoulliImageModel(PyroModule):
    """A model ``p(z) p(x | z)`` of flattened images with a Bernoulli likelihood at ``"x"``.

    Subclasses implement :meth:`generate`, the generative program for ``num`` data points
    inside ``pyro.plate("data", num)``, observing ``x`` when it is given. A model knows
    nothing of its guide: :func:`lvmkit.models.build` pairs the two.

    Example: a subclass writes the generative program once, inside the ``"data"`` plate.

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> from lvmkit.models.vae import BernoulliImageModel, bernoulli_pixels
    >>> class Coins(BernoulliImageModel):
    ...     def __init__(self, x_dim):
    ...         super().__init__(x_dim, name="coins")
    ...         self.logits = torch.nn.Parameter(torch.zeros(x_dim))
    ...     def generate(self, num, x=None):
    ...         with pyro.plate("data", num):
    ...             pyro.sample("x", bernoulli_pixels(self.logits.expand(num, -1)), obs=x)
    >>> Coins(3).sample(2).shape
    torch.Size([2, 3])
    """

    x_dim: int

    def __init__(self, x_dim: int, name: str) -> None:
        super().__init__(name)
        self.x_dim = check_size(x_dim, "x_dim")

    def generate(self, num: int, x: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def default_guide(self) -> PyroModule:
        """The mean-field guide that :func:`lvmkit.models.build` pairs with this model
        (see :func:`lvmkit.models.registry.default_guide`)."""
        from lvmkit.models.registry import default_guide

        return default_guide(self)

    def forward(self, x: torch.Tensor, labels: None = None) -> None:
        check_unsupervised(self, labels)
        check_observations(x, site="x", event_shape=(self.x_dim,), support="unit")
        self.generate(x.shape[0], x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, guide: Callable[..., object]) -> torch.Tensor:
        """Pixel probabilities ``(batch, D)`` of ``p(x | z)`` at a draw ``z ~ q(z | x)``."""
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(self, trace=guide_trace)).get_trace(x)
        return model_trace.nodes["x"]["fn"].mean

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Pixel probabilities ``(n, D)`` of ``p(x | z)`` at ``n`` prior draws of ``z``."""
        # Through ``self(...)`` rather than ``generate`` so that Pyro sees the parameters as
        # in training; the placeholder images only set the batch size.
        placeholder = torch.zeros(check_size(n, "n"), self.x_dim, device=self._device())
        model_trace = poutine.trace(poutine.uncondition(self)).get_trace(placeholder)
        return model_trace.nodes["x"]["fn"].mean

    def _device(self) -> torch.device:
        return next(self.parameters()).device


class VAE(BernoulliImageModel):
    """Variational autoencoder (Kingma & Welling, 2014) with Bernoulli pixels.

    p(z) = N(0, I) at site ``"z"`` with ``z_dim`` dimensions; p(x | z) = Bernoulli with
    logits from a tanh MLP with hidden sizes ``hidden``, at site ``"x"``.

    :param x_dim: number of pixels D of a flattened image.
    :param z_dim: number of latent dimensions.
    :param hidden: tanh hidden layers of the decoder (the default guide mirrors them).
    :param name: prefix of the parameter names in Pyro's param store.

    Example:

    >>> import torch
    >>> from lvmkit.models import VAE
    >>> model = VAE(x_dim=4, z_dim=2, hidden=(8,))
    >>> guide = model.default_guide()
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> model.reconstruct(x, guide).shape
    torch.Size([2, 4])
    >>> model.sample(3).shape
    torch.Size([3, 4])
    """

    def __init__(
        self, x_dim: int, z_dim: int = 50, hidden: Sequence[int] = (200,), *, name: str = "vae"
    ) -> None:
        super().__init__(x_dim, name)
        self.z_dim = check_size(z_dim, "z_dim")
        self.hidden = tuple(hidden)
        self.decoder = mlp(self.z_dim, self.hidden, self.x_dim)
        # a buffer, so that the prior follows the module to its device and dtype
        self.register_buffer("prior_loc", torch.zeros(self.z_dim))

    def generate(self, num: int, x: torch.Tensor | None = None) -> None:
        loc = self.prior_loc
        with pyro.plate("data", num):
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            pyro.sample("x", bernoulli_pixels(self.decoder(z)), obs=x)
