"""Semi-supervised deep generative models: M2, ADGM and SDGM.

- :class:`M2` (Kingma, Rezende, Mohamed & Welling 2014, "Semi-supervised learning with deep
  generative models"): ``p(y) p(z) p(x | y, z)``, guide ``q(y | x) q(z | x, y)``.
- :class:`ADGM` (Maaløe, Sønderby, Sønderby & Winther 2016, "Auxiliary deep generative
  models"): M2 plus an auxiliary ``a`` with ``p(a | x, y, z)`` in the model and
  ``q(a | x)`` feeding ``q(y | a, x)`` and ``q(z | a, x, y)`` in the guide. Because ``a`` is
  a model site too, ``p(a | x, y, z)`` plays the reverse model and the ordinary ELBO is the
  valid auxiliary bound.
- :class:`SDGM` (same paper): ``a`` is a stochastic layer of the generative path,
  ``p(z) p(y) p(a | y, z) p(x | a, y, z)``, with the same guide.

Calling convention. Each class is a ``PyroModule`` whose ``forward(x, labels=None)`` is the
model and whose :meth:`guide` takes the same arguments; :meth:`classify` returns class
probabilities. Train with ``TraceEnum_ELBO(max_plate_nesting=1)``: the guide marks the
class site ``infer={"enumerate": "parallel"}``, so the ELBO sums over the ``C`` classes of
each unlabelled datum exactly (Kingma et al.'s ``U(x)``). (``Trace_ELBO`` also runs, with a
score-function estimate for ``y``, far noisier.)

Labelled and unlabelled data go in the same batch: ``labels`` is an integer tensor ``(N,)``
with the class of each labelled datum and ``-1`` for unlabelled ones; ``labels=None`` means
all unlabelled. Per datum the model observes ``y`` where a label is given and leaves it
latent elsewhere (Pyro's ``obs_mask``: sites ``"y_observed"`` and ``"y_unobserved"``; the
guide samples ``"y_unobserved"``, masked to the unlabelled data). When labels are given the
guide also adds the classification term ``α · log q(y | x)`` (``α · log q(y | a, x)`` for
the auxiliary models, at the guide's draw of ``a``) for each labelled datum as a guide
factor ``"y_classify"`` (subtracted as a guide log-density, so it *adds* ``α log q`` to the
objective). That factor is a training term, not part of any bound: evaluate log-likelihoods
with ``labels=None``.

Pixels are Bernoulli (values in [0, 1]; see :func:`lvmkit.models.vae.bernoulli_pixels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, pyro_method
from torch.nn import functional as F

from lvmkit._validation import check_observations
from lvmkit.models.vae import bernoulli_pixels
from lvmkit.nn import check_size, gaussian_params, mlp

__all__ = ["M2", "ADGM", "SDGM"]


def _check_labels(labels: torch.Tensor | None, n: int, num_classes: int) -> None:
    if labels is None:
        return
    if not torch.is_tensor(labels) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(
            f"site 'y': labels must be an integer tensor (class index, -1 = unlabelled), "
            f"got {labels.dtype if torch.is_tensor(labels) else type(labels).__name__}"
        )
    if labels.shape != (n,):
        raise ValueError(f"site 'y': expected labels of shape ({n},), got {tuple(labels.shape)}")
    bad = (labels < -1) | (labels >= num_classes)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise ValueError(
            f"site 'y': label {int(labels[index])} at index {index} is outside "
            f"[-1, {num_classes - 1}] (-1 marks an unlabelled datum)"
        )


class _SemiSupervised(PyroModule):
    """Shared machinery: label handling, the class site in model and guide, classify."""

    def __init__(
        self, x_dim: int, num_classes: int, z_dim: int, alpha: float, name: str
    ) -> None:
        super().__init__(name)
        self.x_dim = check_size(x_dim, "x_dim")
        self.num_classes = check_size(num_classes, "num_classes")
        self.z_dim = check_size(z_dim, "z_dim")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)

    # -- helpers -----------------------------------------------------------------------
    def _check(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        check_observations(x, site="x", event_shape=(self.x_dim,), support="unit")
        _check_labels(labels, x.shape[0], self.num_classes)

    def _one_hot(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels.clamp(min=0), self.num_classes).to(like)

    def _model_y(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        prior = dist.OneHotCategorical(logits=x.new_zeros(x.shape[0], self.num_classes))
        if labels is None:
            return pyro.sample("y", prior)
        return pyro.sample("y", prior, obs=self._one_hot(labels, x), obs_mask=labels >= 0)

    def _guide_y(
        self, logits: torch.Tensor, labels: torch.Tensor | None, like: torch.Tensor
    ) -> torch.Tensor:
        q_y = dist.OneHotCategorical(logits=logits)
        enumerate_ = {"enumerate": "parallel"}
        if labels is None:
            return pyro.sample("y", q_y, infer=enumerate_)
        labelled = labels >= 0
        with poutine.mask(mask=~labelled):
            unobserved = pyro.sample("y_unobserved", q_y, infer=enumerate_)
        if self.alpha > 0:
            log_q = (q_y.logits.log_softmax(-1) * self._one_hot(labels, like)).sum(-1)
            # subtracted like a guide log-density, so the objective gains + alpha log q(y|x)
            pyro.factor("y_classify", -self.alpha * log_q * labelled, has_rsample=True)
        return torch.where(labelled.unsqueeze(-1), self._one_hot(labels, like), unobserved)

    @staticmethod
    def _cat(*parts: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
        return torch.cat([p.expand(shape + p.shape[-1:]) for p in parts], -1)

    def guide(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, C)`` of the guide's classifier (argmax for a label)."""
        raise NotImplementedError


class M2(_SemiSupervised):
    """Kingma et al. (2014) M2: ``p(y) = Cat(1/C)``, ``p(z) = N(0, I)``,
    ``p(x | y, z) = Bernoulli(MLP([y, z]))``; guide ``q(y | x) = Cat(MLP(x))``,
    ``q(z | x, y) = N(MLP([x, y]))``. See the module docstring for labels and training.

    :param x_dim: pixels D.
    :param num_classes: C.
    :param z_dim: latent dimensions.
    :param hidden: tanh hidden layers of every MLP.
    :param alpha: weight of the classification term per labelled datum.
    :param name: prefix of the parameter names in Pyro's param store.

    Example: one labelled datum (class 1) and one unlabelled (``-1``) in the same batch.

    >>> import torch
    >>> from pyro.infer import TraceEnum_ELBO
    >>> from lvmkit.models import M2
    >>> model = M2(x_dim=4, num_classes=3, z_dim=2, hidden=(8,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = TraceEnum_ELBO(max_plate_nesting=1)
    >>> loss = elbo.loss(model, model.guide, x, labels=torch.tensor([1, -1]))
    >>> model.classify(x).shape
    torch.Size([2, 3])
    """

    def __init__(
        self,
        x_dim: int,
        num_classes: int = 10,
        z_dim: int = 50,
        hidden: Sequence[int] = (500,),
        alpha: float = 1.0,
        *,
        name: str = "m2",
    ) -> None:
        super().__init__(x_dim, num_classes, z_dim, alpha, name)
        hidden = tuple(hidden)
        self.decoder = mlp(num_classes + z_dim, hidden, x_dim)
        self.classifier = mlp(x_dim, hidden, num_classes)
        self.encoder = mlp(x_dim + num_classes, hidden, 2 * z_dim)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self._check(x, labels)
        with pyro.plate("data", x.shape[0]):
            y = self._model_y(x, labels)
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", bernoulli_pixels(self.decoder(self._cat(y, z))), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self._check(x, labels)
        with pyro.plate("data", x.shape[0]):
            y = self._guide_y(self.classifier(x), labels, x)
            loc, scale = gaussian_params(self.encoder(self._cat(x, y)))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        check_observations(x, site="x", event_shape=(self.x_dim,), support="unit")
        return self.classifier(x).softmax(-1)


class ADGM(_SemiSupervised):
    """Auxiliary deep generative model (Maaløe et al. 2016).

    Model ``p(y) p(z) p(x | y, z) p(a | x, y, z)``; guide ``q(a | x) q(y | a, x)
    q(z | a, x, y)``, Gaussians and a categorical with tanh-MLP parameters.
    :meth:`classify` averages ``q(y | a, x)`` over ``num_classify_samples`` draws of ``a``.

    Other parameters as :class:`M2`.

    :param a_dim: auxiliary dimensions.

    Example:

    >>> import torch
    >>> from pyro.infer import TraceEnum_ELBO
    >>> from lvmkit.models import ADGM
    >>> model = ADGM(x_dim=4, num_classes=3, z_dim=2, a_dim=2, hidden=(8,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = TraceEnum_ELBO(max_plate_nesting=1)
    >>> loss = elbo.loss(model, model.guide, x, labels=torch.tensor([1, -1]))
    >>> probs = model.classify(x)
    >>> probs.shape, torch.allclose(probs.sum(-1), torch.ones(2))
    (torch.Size([2, 3]), True)
    """

    generative_auxiliary = False

    def __init__(
        self,
        x_dim: int,
        num_classes: int = 10,
        z_dim: int = 50,
        a_dim: int = 50,
        hidden: Sequence[int] = (500,),
        alpha: float = 1.0,
        num_classify_samples: int = 10,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(x_dim, num_classes, z_dim, alpha, name or type(self).__name__.lower())
        self.a_dim = check_size(a_dim, "a_dim")
        self.num_classify_samples = check_size(num_classify_samples, "num_classify_samples")
        hidden = tuple(hidden)
        c = num_classes
        if self.generative_auxiliary:
            self.aux_decoder = mlp(c + z_dim, hidden, 2 * a_dim)
            self.decoder = mlp(a_dim + c + z_dim, hidden, x_dim)
        else:
            self.aux_decoder = mlp(x_dim + c + z_dim, hidden, 2 * a_dim)
            self.decoder = mlp(c + z_dim, hidden, x_dim)
        self.aux_encoder = mlp(x_dim, hidden, 2 * a_dim)
        self.classifier = mlp(a_dim + x_dim, hidden, c)
        self.encoder = mlp(a_dim + x_dim + c, hidden, 2 * z_dim)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self._check(x, labels)
        with pyro.plate("data", x.shape[0]):
            y = self._model_y(x, labels)
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            if self.generative_auxiliary:
                loc, scale = gaussian_params(self.aux_decoder(self._cat(y, z)))
                a = pyro.sample("a", dist.Normal(loc, scale).to_event(1))
                logits = self.decoder(self._cat(a, y, z))
                pyro.sample("x", bernoulli_pixels(logits), obs=x)
            else:
                pyro.sample("x", bernoulli_pixels(self.decoder(self._cat(y, z))), obs=x)
                loc, scale = gaussian_params(self.aux_decoder(self._cat(x, y, z)))
                pyro.sample("a", dist.Normal(loc, scale).to_event(1))

    @pyro_method
    def guide(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self._check(x, labels)
        loc, scale = gaussian_params(self.aux_encoder(x))
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(loc, scale).to_event(1))
            y = self._guide_y(self.classifier(self._cat(a, x)), labels, x)
            loc, scale = gaussian_params(self.encoder(self._cat(a, x, y)))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        check_observations(x, site="x", event_shape=(self.x_dim,), support="unit")
        loc, scale = gaussian_params(self.aux_encoder(x))
        a = dist.Normal(loc, scale).sample((self.num_classify_samples,))
        return self.classifier(self._cat(a, x)).softmax(-1).mean(0)


class SDGM(ADGM):
    """Skip deep generative model (Maaløe et al. 2016): ``a`` is a stochastic layer of the
    generative path, ``p(z) p(y) p(a | y, z) p(x | a, y, z)``; the guide is ADGM's.
    Parameters as :class:`ADGM`.

    Example:

    >>> import torch
    >>> from pyro.infer import TraceEnum_ELBO
    >>> from lvmkit.models import SDGM
    >>> model = SDGM(x_dim=4, num_classes=3, z_dim=2, a_dim=2, hidden=(8,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, model.guide, x)
    >>> isinstance(loss, float)
    True
    """

    generative_auxiliary = True
