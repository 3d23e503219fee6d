"""RELAX: REBAR with a learned neural control variate.

Grathwohl, Choi, Wu, Roeder, Duvenaud. "Backpropagation through the Void: Optimizing
control variates for black-box gradient estimation." ICLR 2018.

The control variate is ``c(z) = eta f(sigma_lambda(z)) + r_rho(z)``: REBAR's relaxed ELBO
plus a small network ``r_rho`` of the concatenated relaxed latents. The estimator

.. math::

    \\hat g = [f(b) - c(\\tilde z)]\\, \\nabla \\log q(b) + \\nabla c(z) - \\nabla c(\\tilde z)
        + \\nabla f(b)

is unbiased for any ``rho``; ``rho`` (and ``lambda``, optionally ``eta``) are trained on
``||g||^2``, the same variance objective as REBAR's.
"""

from __future__ import annotations

import torch
from pyro.infer.util import MultiFrameTensor

from lvmkit.inference.estimators._relax import EstimatorError, HardPass
from lvmkit.inference.estimators.rebar import RebarELBO, _sanitize
from lvmkit.inference.estimators.sites import PARTICLE_PLATE

__all__ = ["RelaxELBO"]


class RelaxELBO(RebarELBO):
    """RELAX estimator (Grathwohl et al. 2018) as a drop-in ``Trace_ELBO``.

    Everything of :class:`~lvmkit.inference.estimators.rebar.RebarELBO` applies (site
    discovery, opt-out with ``infer={"relax": False}``, plates, particles, several layers,
    continuous sites, ``loss_and_grads`` and ``differentiable_loss``). The control network
    ``r_rho`` is an MLP ``features -> hidden_size -> 1`` (tanh), applied per element of the
    plates that hold the discrete sites, on the concatenation of their relaxed values
    (flattened event dimensions); its output is scaled like the sites (subsampling) and
    Rao-Blackwellized by plate like the rest of the control variate. The last layer starts
    at zero, so RELAX starts out as REBAR. The network is created on the first call
    (its input size is known then); pass ``input_size`` to create it up front, e.g. before
    handing ``elbo(model, guide).parameters()`` to an optimizer.

    Discrete sites in different plates (a global latent beside a ``pyro.plate("data")``,
    say) get one network per group of sites that share their plates (``controls.net`` for
    the first group sampled, ``controls.group_nets[plates]`` for the others), each output
    Rao-Blackwellized by its own plates.

    :param hidden_size: width of ``r_rho``'s hidden layer.
    :param learn_net: train ``rho`` on the variance objective.
    :param eta: scale of the relaxed-ELBO part; fixed at 1 by default (Grathwohl et al.).

    Example: one SVI step on a small sigmoid belief net.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import RelaxELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = RelaxELBO(hidden_size=8)
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=elbo)
    >>> isinstance(svi.step(x), float)
    True
    >>> sorted(elbo.diagnostics())
    ['eta/b1', 'temperature', 'variance_objective']
    """

    estimator_name = "RelaxELBO"
    opt_out_key = "relax"

    def __init__(
        self,
        num_particles: int = 1,
        temperature: float = 0.5,
        eta: float = 1.0,
        learn_temperature: bool = True,
        learn_eta: bool = False,
        learn_net: bool = True,
        hidden_size: int = 16,
        input_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            num_particles=num_particles,
            temperature=temperature,
            eta=eta,
            learn_temperature=learn_temperature,
            learn_eta=learn_eta,
            **kwargs,
        )
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        self.learn_net = learn_net
        self.hidden_size = hidden_size
        if input_size is not None:
            self._build_net(input_size, torch.zeros(()))

    def _net_learnable(self) -> bool:
        return self.learn_net

    def _build_net(self, input_size: int, like: torch.Tensor, group: str | None = None
                   ) -> torch.nn.Module:
        """A zero-output control net; the first plate group's is ``controls.net``, any
        other group's ``controls.group_nets[group]``."""
        net = torch.nn.Sequential(
            torch.nn.Linear(input_size, self.hidden_size),
            torch.nn.Tanh(),
            torch.nn.Linear(self.hidden_size, 1),
        )
        torch.nn.init.zeros_(net[2].weight)
        torch.nn.init.zeros_(net[2].bias)
        net.to(device=like.device, dtype=like.dtype)
        for p in net.parameters():
            p.requires_grad_(self.learn_net)
        if group is None:
            self.controls.net = net
        else:
            self.controls.group_nets[group] = net
        return net

    def _restore_net(self, controls: dict) -> None:
        weight = controls.get("net.0.weight")
        if weight is not None and self.controls.net is None:
            self._build_net(weight.shape[1], weight)
        prefix, suffix = "group_nets.", ".0.weight"
        for key, weight in controls.items():
            if key.startswith(prefix) and key.endswith(suffix):
                group = key[len(prefix):-len(suffix)]
                if group not in self.controls.group_nets:
                    self._build_net(weight.shape[1], weight, group)

    def _extra_control(self, values, guide_trace, hard: HardPass) -> MultiFrameTensor:
        """``r_rho`` of the relaxed values, one term per element of the plates of each
        group of discrete sites that sit in the same plates (one net per group)."""
        terms = MultiFrameTensor()
        for index, (group, records) in enumerate(_plate_groups(guide_trace, hard).items()):
            site = guide_trace.nodes[records[0].name]
            features = _features(values, guide_trace, records)
            net = self._group_net(index, group, features)
            out = net(features).squeeze(-1)
            terms.add((site["cond_indep_stack"], out * site["scale"]))
        return terms

    def _group_net(self, index: int, group: str, features: torch.Tensor) -> torch.nn.Module:
        if index == 0:
            net = self.controls.net
        else:
            group = _sanitize(group)
            net = self.controls.group_nets[group] if group in self.controls.group_nets else None
        if net is None:
            return self._build_net(features.shape[-1], features, None if index == 0 else group)
        if net[0].in_features != features.shape[-1]:
            raise EstimatorError(
                f"{self.estimator_name}: the control network of plates {group!r} was built "
                f"for {net[0].in_features} relaxed features per plate element, but the "
                f"discrete sites now give {features.shape[-1]}"
            )
        return net

    def _learnable_nets(self) -> list[torch.nn.Module]:
        nets = [] if self.controls.net is None else [self.controls.net]
        return nets + list(self.controls.group_nets.values())


def _plate_groups(guide_trace, hard: HardPass) -> dict[str, list]:
    """The relaxed sites grouped by the vectorized plates they sit in, in sampling order;
    keyed by the plates' names (``"global"`` for none; vectorized particles are in every
    group and not named)."""
    groups: dict[str, list] = {}
    for record in hard.relaxed:
        frames = guide_trace.nodes[record.name]["cond_indep_stack"]
        names = sorted(f.name for f in frames if f.vectorized and f.name != PARTICLE_PLATE)
        groups.setdefault("+".join(names) or "global", []).append(record)
    return groups


def _features(values, guide_trace, records) -> torch.Tensor:
    """Concatenate the relaxed values of sites in the same plates along a feature axis,
    broadcasting their batch dims."""
    pieces = []
    for record in records:
        site = guide_trace.nodes[record.name]
        value = values[record.name]
        event_dim = site["fn"].event_dim
        batch_shape = value.shape[: value.dim() - event_dim]
        pieces.append(value.reshape(batch_shape + (-1,)))
    if len(pieces) == 1:
        return pieces[0]  # one site: its values are the features (no copy)
    ndim = max(p.dim() for p in pieces)
    pieces = [p.reshape((1,) * (ndim - p.dim()) + p.shape) for p in pieces]
    batch = torch.broadcast_shapes(*(p.shape[:-1] for p in pieces))
    return torch.cat([p.expand(batch + p.shape[-1:]) for p in pieces], dim=-1)
