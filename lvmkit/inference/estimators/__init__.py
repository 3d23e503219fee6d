"""Gradient estimators, one per module, each a subclass of ``pyro.infer.Trace_ELBO``."""


class EstimatorError(ValueError):
    """A model/guide pair (or a site of it) that an estimator refuses, with the site, the
    argument, the shape or the value at fault. A ``ValueError``, so that existing
    ``except ValueError`` handlers keep working.

    Example:

    >>> import torch
    >>> from lvmkit.inference import ARMELBO, EstimatorError
    >>> from lvmkit.models import build
    >>> model, guide = build("categorical-vae", x_dim=4, num_latents=2, num_categories=3)
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    >>> try:
    ...     ARMELBO().loss(model, guide, x)
    ... except EstimatorError as error:
    ...     print(error)
    site 'z': ARMELBO supports Bernoulli sites (and reparameterized continuous ones) only,
    got OneHotCategorical; for one-hot sites use CategoricalDisARMELBO (DisARM's
    stick-breaking extension), or RLOOELBO, NVILELBO or RebarELBO
    >>> issubclass(EstimatorError, ValueError)
    True
    """


__all__ = ["EstimatorError"]
