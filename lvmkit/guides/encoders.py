"""Amortized approximate posteriors q(z | x) for the models in :mod:`lvmkit.models`.

Every guide is a :class:`~pyro.nn.PyroModule` called with the same arguments as its model
(``guide(x)``), samples the same site names inside ``pyro.plate("data", x.shape[0])``, and
draws discrete latents as ``Bernoulli(logits=...)`` / ``OneHotCategorical(logits=...)``
sites ``.to_event(1)``. Upstream samples reach downstream layers only through arithmetic
(matrix multiplies), so a gradient estimator may replay a guide with relaxed values in
(0, 1) in place of binary samples and get the downstream logits of the relaxed values.

Parameter names in Pyro's param store are prefixed with the module's ``name``; give two
instances that live in the same param store different names.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from lvmkit._validation import check_observations

# The shared layers live in lvmkit.nn; they stay importable from here.
from lvmkit.nn import MIN_SCALE, check_size, check_unsupervised, gaussian_params, mlp

__all__ = [
    "BernoulliEncoder",
    "GaussianEncoder",
    "MIN_SCALE",
    "OneHotEncoder",
    "TwoLayerEncoder",
    "check_size",
    "check_unsupervised",
    "gaussian_params",
    "mlp",
]

class GaussianEncoder(PyroModule):
    """q(z | x) = N(z; mu(x), diag sigma(x)^2) at site ``"z"`` (Kingma & Welling, 2014).

    :param x_dim: number of pixels D of a flattened image.
    :param z_dim: number of latent dimensions.
    :param hidden: sizes of the tanh hidden layers of the encoder MLP.
    :param name: prefix of the parameter names in Pyro's param store.

    Example:

    >>> import torch
    >>> from lvmkit.guides import GaussianEncoder
    >>> guide = GaussianEncoder(x_dim=4, z_dim=2, hidden=(8,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> guide(x).shape
    torch.Size([2, 2])
    """

    def __init__(
        self, x_dim: int, z_dim: int, hidden: Sequence[int] = (200,), *, name: str = "encoder"
    ) -> None:
        super().__init__(name)
        self.x_dim = check_size(x_dim, "x_dim")
        self.z_dim = check_size(z_dim, "z_dim")
        self.net = mlp(x_dim, tuple(hidden), 2 * z_dim)

    def forward(self, x: torch.Tensor, labels: None = None) -> torch.Tensor:
        check_unsupervised(self, labels)
        check_observations(x, site="x", event_shape=(self.x_dim,), support="unit")
        loc, scale = gaussian_params(self.net(x))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class BernoulliEncoder(PyroModule):
    """Bottom-up mean-field posterior of a sigmoid belief net (Tucker et al., 2017, sec. 5).

    q(b_1, ..., b_L | x) = q(b_1 | x) q(b_2 | b_1) ... q(b_L | b_{L-1}), each factor a
    product of Bernoullis whose logits are a linear map of the layer below (or, with
    ``nonlinear=True``, an MLP with two tanh layers of ``hidden`` units, following Mnih &
    Gregor, 2014). Sites ``"b1"`` (nearest the data) ... ``"bL"``, matching
    :class:`lvmkit.models.SigmoidBeliefNet`.

    :param x_dim: number of pixels D.
    :param layers: units per stochastic layer, ``layers[0]`` nearest the data.
    :param nonlinear: two tanh layers between stochastic layers instead of a linear map.
    :param hidden: units of those tanh layers.
    :param name: prefix of the parameter names in Pyro's param store.

    Example: the guide returns one binary sample per layer, ``b1`` first.

    >>> import torch
    >>> from lvmkit.guides import BernoulliEncoder
    >>> guide = BernoulliEncoder(x_dim=4, layers=(3, 2))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> [b.shape for b in guide(x)]
    [torch.Size([2, 3]), torch.Size([2, 2])]
    """

    def __init__(
        self,
        x_dim: int,
        layers: Sequence[int] = (200,),
        nonlinear: bool = False,
        hidden: int = 200,
        *,
        name: str = "encoder",
    ) -> None:
        super().__init__(name)
        self.x_dim = check_size(x_dim, "x_dim")
        self.layers = tuple(check_size(u, "stochastic layer size") for u in layers)
        if not self.layers:
            raise ValueError("layers must name at least one stochastic layer")
        between = (check_size(hidden, "hidden"),) * 2 if nonlinear else ()
        inputs = (self.x_dim,) + self.layers[:-1]
        self.nets = nn.ModuleList(
            mlp(i, between, o) for i, o in zip(inputs, self.layers, strict=True)
        )

    def forward(self, x: torch.Tensor, labels: None = None) -> list[torch.Tensor]:
        check_unsupervised(self, labels)
        check_observations(x, site="x", event_shape=(self.x_dim,), support="unit")
        samples = []
        below = x
        with pyro.plate("data", x.shape[0]):
            for index, net in enumerate(self.nets, start=1):
                # `below` enters only through the net's matrix multiply, so a relaxed
                # replay of the upstream site changes these logits smoothly.
                below = pyro.sample(f"b{index}", dist.Bernoulli(logits=net(below)).to_event(1))
                samples.append(below)
        return samples


class OneHotEncoder(PyroModule):
    """q(z | x) = prod_l Cat(z_l; softmax(logits_l(x))) at site ``"z"``, one-hot coded.

    The site's value has shape ``(batch, num_latents, num_categories)``, as in the
    categorical VAE of Jang et al. (2017) and Maddison et al. (2017).

    :param x_dim: number of pixels D.
    :param num_latents: number of categorical variables.
    :param num_categories: categories per variable.
    :param hidden: sizes of the tanh hidden layers.
    :param name: prefix of the parameter names in Pyro's param store.

    Example:

    >>> import torch
    >>> from lvmkit.guides import OneHotEncoder
    >>> guide = OneHotEncoder(x_dim=4, num_latents=2, num_categories=3, hidden=(8,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> z = guide(x)
    >>> z.shape, bool((z.sum(-1) == 1).all())
    (torch.Size([2, 2, 3]), True)
    """

    def __init__(
        self,
        x_dim: int,
        num_latents: int = 20,
        num_categories: int = 10,
        hidden: Sequence[int] = (200,),
        *,
        name: str = "encoder",
    ) -> None:
        super().__init__(name)
        self.x_dim = check_size(x_dim, "x_dim")
        self.num_latents = check_size(num_latents, "num_latents")
        self.num_categories = check_size(num_categories, "num_categories")
        self.net = mlp(x_dim, tuple(hidden), num_latents * num_categories)

    def forward(self, x: torch.Tensor, labels: None = None) -> torch.Tensor:
        check_unsupervised(self, labels)
        check_observations(x, site="x", event_shape=(self.x_dim,), support="unit")
        logits = self.net(x).unflatten(-1, (self.num_latents, self.num_categories))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.OneHotCategorical(logits=logits).to_event(1))


class TwoLayerEncoder(PyroModule):
    """Bottom-up posterior q(z_1 | x) q(z_2 | z_1) ... of a stacked Gaussian VAE.

    The structure of the IWAE paper's two-stochastic-layer recognition network (Burda et
    al., 2016, sec. 5): each factor is a diagonal Gaussian whose parameters come from a
    tanh MLP of the layer below. Sites ``"z1"`` (nearest the data) ... ``"zL"``, matching
    :class:`lvmkit.models.TwoLayerVAE`.

    :param x_dim: number of pixels D.
    :param z_dims: units per stochastic layer, ``z_dims[0]`` nearest the data.
    :param hidden: one tuple of tanh layer sizes per stochastic layer: ``hidden[0]`` maps
        x to z_1, ``hidden[1]`` maps z_1 to z_2, ...
    :param name: prefix of the parameter names in Pyro's param store.

    Example:

    >>> import torch
    >>> from lvmkit.guides import TwoLayerEncoder
    >>> guide = TwoLayerEncoder(x_dim=4, z_dims=(3, 2), hidden=((8,), (8,)))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> [z.shape for z in guide(x)]
    [torch.Size([2, 3]), torch.Size([2, 2])]
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Sequence[int] = (100, 50),
        hidden: Sequence[Sequence[int]] = ((200, 200), (100, 100)),
        *,
        name: str = "encoder",
    ) -> None:
        super().__init__(name)
        self.x_dim = check_size(x_dim, "x_dim")
        self.z_dims = tuple(check_size(d, "stochastic layer size") for d in z_dims)
        if not self.z_dims or len(hidden) != len(self.z_dims):
            raise ValueError(
                f"need one hidden spec per stochastic layer: z_dims={tuple(z_dims)},"
                f" hidden={tuple(map(tuple, hidden))}"
            )
        inputs = (self.x_dim,) + self.z_dims[:-1]
        self.nets = nn.ModuleList(
            mlp(i, tuple(h), 2 * o) for i, h, o in zip(inputs, hidden, self.z_dims, strict=True)
        )

    def forward(self, x: torch.Tensor, labels: None = None) -> list[torch.Tensor]:
        check_unsupervised(self, labels)
        check_observations(x, site="x", event_shape=(self.x_dim,), support="unit")
        samples = []
        below = x
        with pyro.plate("data", x.shape[0]):
            for index, net in enumerate(self.nets, start=1):
                loc, scale = gaussian_params(net(below))
                below = pyro.sample(f"z{index}", dist.Normal(loc, scale).to_event(1))
                samples.append(below)
        return samples
