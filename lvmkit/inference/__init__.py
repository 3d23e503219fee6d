"""Training, evaluation, gradient estimators and diagnostics."""

from lvmkit._lazy import lazy_exports

# name -> submodule; add a line when a module gains a public name.
_EXPORTS: dict[str, str] = {
    "fit": "lvmkit.inference.training",
    "History": "lvmkit.inference.training",
    "log_likelihood": "lvmkit.inference.evaluate",
    "elbo_per_datum": "lvmkit.inference.evaluate",
    "log_weights": "lvmkit.inference.evaluate",
    "to_arviz": "lvmkit.inference.arviz_export",
    "psis_khat": "lvmkit.inference.psis",
    "compare_with_nuts": "lvmkit.inference.nuts",
    "KhatResult": "lvmkit.inference.psis",
    "NutsComparison": "lvmkit.inference.nuts",
    "make_estimator": "lvmkit.inference.registry",
    "ESTIMATOR_NAMES": "lvmkit.inference.registry",
    "NVILELBO": "lvmkit.inference.estimators.nvil",
    "VIMCOELBO": "lvmkit.inference.estimators.vimco",
    "ARMELBO": "lvmkit.inference.estimators.arm",
    "DisARMELBO": "lvmkit.inference.estimators.arm",
    "compare_estimators": "lvmkit.inference.compare",
    "RebarELBO": "lvmkit.inference.estimators.rebar",
    "RelaxELBO": "lvmkit.inference.estimators.relax",
    "ConcreteELBO": "lvmkit.inference.estimators.concrete",
    "check_unbiased": "lvmkit.inference.check",
    "exact_elbo_gradient": "lvmkit.inference.check",
    "exact_iwae_gradient": "lvmkit.inference.check",
    "EstimatorError": "lvmkit.inference.estimators",
    "gradient_variance": "lvmkit.inference.check",
    "UnbiasedCheck": "lvmkit.inference.check",
    "RLOOELBO": "lvmkit.inference.estimators.rloo",
    "DoubleCVELBO": "lvmkit.inference.estimators.double_cv",
    "RodeoELBO": "lvmkit.inference.estimators.rodeo",
    "CategoricalDisARMELBO": "lvmkit.inference.estimators.disarm_categorical",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
