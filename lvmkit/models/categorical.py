"""A VAE with several one-hot categorical latents (Jang et al., 2017; Maddison et al., 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from lvmkit.models.vae import BernoulliImageModel, bernoulli_pixels
from lvmkit.nn import check_size, mlp


class CategoricalVAE(BernoulliImageModel):
    """p(z) = prod_l Cat(z_l; softmax(c_l)), p(x | z) = Bernoulli(logits=f(flatten(z))).

    Site ``"z"`` is ``OneHotCategorical(logits=c).to_event(1)`` with value shape
    ``(batch, num_latents, num_categories)``; the decoder f, a tanh MLP, reads the
    flattened one-hot codes through a matrix multiply (so relaxed codes work too). The
    prior logits c are zero (uniform), or learned with ``learn_prior=True``.

    :param x_dim: number of pixels D.
    :param num_latents: number of categorical variables.
    :param num_categories: categories per variable.
    :param hidden: tanh hidden layers of the decoder (the default guide mirrors them).
    :param learn_prior: learn the prior logits instead of keeping them uniform.
    :param name: prefix of the parameter names in Pyro's param store.

    Example:

    >>> import pyro
    >>> import torch
    >>> from lvmkit.models import CategoricalVAE
    >>> model = CategoricalVAE(x_dim=4, num_latents=2, num_categories=3, hidden=(8,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> z = pyro.poutine.trace(model).get_trace(x).nodes["z"]["value"]
    >>> z.shape, bool((z.sum(-1) == 1).all())
    (torch.Size([2, 2, 3]), True)
    """

    def __init__(
        self,
        x_dim: int,
        num_latents: int = 20,
        num_categories: int = 10,
        hidden: Sequence[int] = (200,),
        learn_prior: bool = False,
        *,
        name: str = "categorical_vae",
    ) -> None:
        super().__init__(x_dim, name)
        self.num_latents = check_size(num_latents, "num_latents")
        self.num_categories = check_size(num_categories, "num_categories")
        self.hidden = tuple(hidden)
        prior_logits = torch.zeros(self.num_latents, self.num_categories)
        if learn_prior:
            self.prior_logits = nn.Parameter(prior_logits)
        else:
            self.register_buffer("prior_logits", prior_logits)
        self.decoder = mlp(self.num_latents * self.num_categories, self.hidden, self.x_dim)

    def generate(self, num: int, x: torch.Tensor | None = None) -> None:
        with pyro.plate("data", num):
            prior = dist.OneHotCategorical(logits=self.prior_logits).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", bernoulli_pixels(self.decoder(z.flatten(-2))), obs=x)
