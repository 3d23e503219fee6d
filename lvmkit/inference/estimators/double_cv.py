"""Double control variates for RLOO (Titsias & Shi, AISTATS 2022)."""

from __future__ import annotations

import itertools

import pyro
import torch
from pyro.params import param_with_module_name
from torch import nn

from lvmkit.inference.estimators._score import (
    BERNOULLI,
    ONEHOT,
    LeaveOneOutELBO,
    covariance_times,
    loo_mean,
    reduce_like,
)

__all__ = ["DoubleCVELBO"]

_instance_ids = itertools.count()


def register_own_parameters(module_name: str, module: nn.Module) -> None:
    """``pyro.module(module_name, module)``, making the store hold *this* module's tensors.

    ``pyro.module`` keeps a store entry that already exists under the name (and a deep
    copy of an estimator, or one restored from a checkpoint, shares its ``module_name``),
    so ``SVI``'s optimizer would step the stale tensors and never this module's.
    """
    store = pyro.get_param_store()
    stored = dict(store.named_parameters())
    for name, param in module.named_parameters():
        full_name = param_with_module_name(module_name, name)
        if full_name in stored and stored[full_name] is not param:
            del store[full_name]
    pyro.module(module_name, module)


def control_key(name: str) -> str:
    """A ``ModuleDict`` key for a site name (keys may not contain dots)."""
    return "site_" + name.replace(".", "_dot_")


class DoubleCVELBO(LeaveOneOutELBO, nn.Module):
    """ELBO gradient with RLOO plus the Taylor-expansion double control variate (Titsias &
    Shi, 2022, "Double control variates for gradient estimation in discrete latent variable
    models", AISTATS).

    For a Bernoulli or OneHotCategorical guide site with logits ``eta``, probabilities
    ``pi`` and ``K = num_particles`` draws ``b_1..b_K`` per datum, let
    ``g_k = df/db (b_k)`` (the learning signal's gradient in the sampled value, one
    backward pass, no extra evaluation of ``f``) and ``gbar_k = mean_{j != k} g_j``. The
    double control variate is the first-order Taylor term around the mean,
    ``c_k = alpha gbar_k . (b_k - pi)``, and the per-logit estimate is

    .. math::

        \\hat g_\\eta = \\frac1K \\sum_k \\Big[\\big(f_k + c_k - \\frac{1}{K-1}
            \\sum_{j \\ne k} (f_j + c_j)\\big)(b_k - \\pi)
            - \\alpha\\, \\mathrm{Cov}_q[b]\\, \\bar g_k\\Big],

    with ``Cov_q[b] v = pi (1 - pi) v`` (Bernoulli) or ``pi (v - pi . v)`` (one-hot
    groups): the last term is ``E[c_k (b_k - pi)]`` in closed form, so the estimator is
    unbiased for every ``alpha`` (``gbar_k`` and the baselines use only the other draws;
    the ``c_j`` in the baseline have mean zero given draw ``k``). ``alpha`` (one scalar per
    site, initialised at 0, i.e. RLOO) is trained to minimise the mean squared logit
    estimate, as in the authors' code (thjashin/rodeo, ``grad_type="double_cv"``).

    ``alpha`` lives in this ``nn.Module`` (``controls``) and is registered with
    ``pyro.module`` under ``module_name`` on every call, so ``SVI``'s optimizer trains it
    with the model (the authors used Adam at 1e-3 for it, as for the model); the surrogate
    gains ``-mean(g_eta^2)``, which moves only ``alpha``. Sites are created lazily, so
    build a plain torch optimizer after a first call.

    ``df/db`` needs the model and guide to use the site's value arithmetically
    (``z @ W``); a value used otherwise (indexing, ``if``) contributes no gradient there,
    which costs variance reduction but not unbiasedness. Other non-reparameterized sites
    get plain RLOO; reparameterized sites their pathwise gradient.

    :param num_particles: ``K >= 2`` draws (model evaluations) per datum.
    :param module_name: param-store name of the controls (unique per instance).

    Example: one SVI step on a small sigmoid belief net.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import DoubleCVELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = DoubleCVELBO(num_particles=2)
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=elbo)
    >>> isinstance(svi.step(x), float)
    True
    """

    estimator_name = "DoubleCVELBO"
    value_gradients = True

    def __init__(self, num_particles: int = 2, *, module_name: str | None = None, **kwargs):
        nn.Module.__init__(self)
        LeaveOneOutELBO.__init__(self, num_particles=num_particles, **kwargs)
        self.module_name = module_name or f"{type(self).__name__.lower()}_{next(_instance_ids)}"
        self.controls = nn.ModuleDict()

    def get_extra_state(self) -> dict:
        # saved with the controls, so a restored estimator keeps the param-store names
        # (and so the optimizer state) of the run that saved it
        return {"module_name": self.module_name}

    def set_extra_state(self, state: dict) -> None:
        self.module_name = state["module_name"]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, first creating the per-site controls a saved state
        holds (they are otherwise created on first use), then registering them in Pyro's
        param store, so that :func:`lvmkit.inference.fit` can resume a run."""
        for key in state_dict:
            parts = key.split(".")
            if parts[0] == "controls" and len(parts) > 2 and parts[1] not in self.controls:
                self.controls[parts[1]] = self._make_control()
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        register_own_parameters(self.module_name, self.controls)
        return result

    def _uses_logits(self, kind) -> bool:
        return kind in (BERNOULLI, ONEHOT)

    def _make_control(self) -> nn.Module:
        control = nn.Module()
        control.alpha = nn.Parameter(torch.zeros(()))
        return control

    def _control(self, name: str, like: torch.Tensor) -> nn.Module:
        key = control_key(name)
        if key not in self.controls:
            self.controls[key] = self._make_control().to(like.device)
        elif next(self.controls[key].parameters()).device != like.device:
            # in place: the parameters stay the objects the param store holds
            self.controls[key].to(like.device)
        register_own_parameters(self.module_name, self.controls)
        return self.controls[key]

    def _discrete_coefficient(self, name, kind, f, value, probs, grad_b, pdim, mask=None):
        alpha = self._control(name, value).alpha.to(value.dtype)
        s = value - probs
        gbar = loo_mean(grad_b, pdim)
        cv = alpha * reduce_like(gbar * s, f.shape)
        shifted = f + cv
        return (shifted - loo_mean(shifted, pdim)) * s - alpha * covariance_times(
            kind, probs, gbar
        )
