"""Gradient estimators, one per module, each a subclass of ``pyro.infer.Trace_ELBO``."""


class EstimatorError(ValueError):
    """A model/guide pair (or a site of it) that an estimator refuses, with the site, the
    argument, the shape or the value at fault. A ``ValueError``, so that existing
    ``except ValueError`` handlers keep working."""


__all__ = ["EstimatorError"]
