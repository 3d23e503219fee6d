"""A VAE with stacked Gaussian stochastic layers (Burda et al., 2016, sec. 5)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from lvmkit.models.vae import BernoulliImageModel, bernoulli_pixels
from lvmkit.nn import check_size, gaussian_params, mlp


class TwoLayerVAE(BernoulliImageModel):
    """p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_2) p(x | z_1) with diagonal Gaussian layers.

    Site naming: ``"z1"`` nearest the data with ``z_dims[0]`` units, ``"zL"`` on top with
    prior N(0, I). Each conditional is a diagonal Gaussian (or, for x, Bernoulli) whose
    parameters come from a tanh MLP: ``hidden[0]`` maps z_1 to x, ``hidden[1]`` maps z_2 to
    z_1, and so on. The defaults are the IWAE paper's two-layer MNIST architecture:
    stochastic layers 100-50, deterministic layers 200-200 and 100-100.

    :param x_dim: number of pixels D.
    :param z_dims: units per stochastic layer, ``z_dims[0]`` nearest the data.
    :param hidden: one tuple of tanh layer sizes per stochastic layer.
    :param name: prefix of the parameter names in Pyro's param store.

    Example:

    >>> import pyro
    >>> import torch
    >>> from lvmkit.models import TwoLayerVAE
    >>> model = TwoLayerVAE(x_dim=4, z_dims=(3, 2), hidden=((8,), (8,)))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> trace = pyro.poutine.trace(model).get_trace(x)
    >>> trace.nodes["z1"]["value"].shape, trace.nodes["z2"]["value"].shape
    (torch.Size([2, 3]), torch.Size([2, 2]))
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Sequence[int] = (100, 50),
        hidden: Sequence[Sequence[int]] = ((200, 200), (100, 100)),
        *,
        name: str = "two_layer_vae",
    ) -> None:
        super().__init__(x_dim, name)
        self.z_dims = tuple(check_size(d, "stochastic layer size") for d in z_dims)
        self.hidden = tuple(tuple(h) for h in hidden)
        if not self.z_dims or len(self.hidden) != len(self.z_dims):
            raise ValueError(
                f"need one hidden spec per stochastic layer: z_dims={self.z_dims},"
                f" hidden={self.hidden}"
            )
        # decoders[0] gives the pixel logits; decoders[l] the Gaussian parameters of z_l.
        self.register_buffer("prior_loc", torch.zeros(self.z_dims[-1]))
        outputs = (self.x_dim,) + tuple(2 * d for d in self.z_dims[:-1])
        self.decoders = nn.ModuleList(
            mlp(i, h, o) for i, h, o in zip(self.z_dims, self.hidden, outputs, strict=True)
        )

    def generate(self, num: int, x: torch.Tensor | None = None) -> None:
        top = len(self.z_dims)
        loc = self.prior_loc
        with pyro.plate("data", num):
            above = pyro.sample(f"z{top}", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            for index in range(top - 1, 0, -1):
                loc, scale = gaussian_params(self.decoders[index](above))
                above = pyro.sample(f"z{index}", dist.Normal(loc, scale).to_event(1))
            pyro.sample("x", bernoulli_pixels(self.decoders[0](above)), obs=x)
