"""Gradient estimators, one per module, each a subclass of ``pyro.infer.Trace_ELBO``."""
