"""An amortized hierarchical autoguide for models with per-datum latents in a data plate.

For a model with global latents ``theta`` (optional) and per-datum latents ``z_i`` inside a
(possibly subsampled) data plate, :class:`AmortizedAutoHVM` is the hierarchical variational
model (Ranganath, Tran & Blei 2016) of each ``z_i``, amortized over the data by networks of
``x_i`` as in the auxiliary deep generative model (Maaløe et al. 2016)::

    q(theta) prod_i q(a_i | x_i) q(z_i | a_i, x_i),   reverse model r(a_i | z_i, x_i)

and its objective is the auxiliary bound, a sum over data::

    log p(x) >= E[ log p(theta) - log q(theta)
                   + sum_i ( log p(x_i, z_i | theta) + log r(a_i | z_i, x_i)
                             - log q(a_i | x_i) - log q(z_i | a_i, x_i) ) ]

valid for any ``r`` (it is the marginal ELBO minus ``E KL(q(a | z, x) || r(a | z, x))``),
or, with ``num_aux_samples = K > 0``, its IWHVI version (Sobolev & Vetrov 2019): the per-datum
``log q(z_i | x_i)`` is replaced by ``log 1/(K+1) sum_{k=0..K} q(a_k | x_i) q(z_i | a_k, x_i)
/ r(a_k | z_i, x_i)`` with ``a_0`` the draw that generated ``z_i`` and ``a_1..a_K ~ r``, which
tightens the bound monotonically in ``K``. Every per-datum term, the reverse one included, is
a site inside the data plate, so a subsampled plate (or :func:`lvmkit.inference.fit`'s N / B
scaling of a plate over the batch) scales it by N / B like the model's per-datum terms: the
mini-batch estimate is unbiased for the full-data bound (Hoffman et al. 2013).

Because the guide has no per-datum parameters (only networks of ``x_i``), it can be trained
the way ``AutoNormal`` is trained with subsampling, and also on a plain plate over the batch
at B < N, which ``fit`` refuses for ``AutoNormal``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide, AutoNormal
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from torch import nn
from torch.nn import functional as F

from lvmkit.guides.hierarchical import (
    EqualMixtureNormal,
    iwhvi_log_q_hat,
    reverse_factor,
)
from lvmkit.nn import MIN_SCALE, check_size, mlp

__all__ = ["AmortizedAutoHVM"]


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _apply(net: nn.Sequential, h: torch.Tensor, detach: bool) -> torch.Tensor:
    """``net(h)``, with the parameters held fixed (not ``h``) when ``detach``."""
    if not detach:
        return net(h)
    for layer in net:
        if isinstance(layer, nn.Linear):
            h = F.linear(h, layer.weight.detach(), layer.bias.detach())
        else:
            h = layer(h)
    return h


def _zero_output(net: nn.Sequential) -> None:
    with torch.no_grad():
        net[-1].weight.zero_()
        net[-1].bias.zero_()


def _check_count(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


class _LocalSite:
    """Where a per-datum latent site's unconstrained values sit in the vector ``u_i``."""

    def __init__(self, name: str, site: dict, plate_pos: int, offset: int, unconstrained):
        self.name = name
        self.fn = site["fn"]
        self.event_dim = site["fn"].event_dim
        self.frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        # the site's dims right of the data plate's (inner plates and the event), per datum
        self.rest_shape = tuple(unconstrained.shape[plate_pos + 1 :])
        self.size = max(1, math.prod(self.rest_shape))
        self.offset = offset


class AmortizedAutoHVM(AutoGuide):
    """Amortized hierarchical variational guide for per-datum latents in a data plate.

    Every latent site inside the plate ``data_plate`` is transformed to unconstrained space
    and the per-datum values are concatenated into ``u_i`` (``D`` numbers per datum). Each
    datum's inputs ``x_i`` (every tensor argument of the model with one row per datum,
    flattened and standardised with the mean and standard deviation seen at setup; or
    ``input_fn``) feed tanh MLPs:

    - ``q(a_i | x_i)``: an equal-weight mixture of ``num_components`` diagonal Gaussians on
      ``R^aux_dim`` whose locations and scales are network outputs
      (:class:`~lvmkit.guides.hierarchical.EqualMixtureNormal`),
    - ``q(u_i | a_i, x_i) = N(u0 + f(x_i) + P a_i, diag σ(a_i, x_i)^2)``: a scale mixture
      around each component (the noise depends on ``a_i``), so ``q(u_i | x_i)`` has no
      closed-form density,
    - ``r(a_i | u_i, x_i) = N(P^T (u_i - u0 - f(x_i)) + g(u_i, x_i), diag ρ(u_i, x_i)^2)``,

    ``P`` a fixed zero-padded identity; ``f, g`` start at zero and ``σ, ρ`` at
    ``noise_scale``, so ``q(u_i | x_i)`` starts as the mixture and the reverse model as its
    inverse. ``r`` inverts ``q``'s location exactly, so it follows ``q`` as ``q`` is learned.
    A location ``u0 + P a + f(a, x)`` nonlinear in ``a`` was tried first: the reverse model
    could not follow ``f`` (learning its inverse, or by fixed-point steps when ``f`` grew
    beyond a contraction), and at ``lr=1e-2`` with one particle the bound ended below an
    amortized mean-field guide's (``results/amortized_hvm.md``).

    The objective (module docstring) is the auxiliary bound of Ranganath et al.
    (2016) and Maaløe et al. (2016) with ``num_aux_samples=0``, and the IWHVI bound of
    Sobolev & Vetrov (2019) with ``K > 0`` reverse draws (the reverse model then gets DReG
    gradients, :func:`~lvmkit.guides.hierarchical.iwhvi_log_q_hat`). The sites
    ``_<name>_aux`` (``a``), ``_<name>_latent`` (``u``) and the reverse factor
    ``_<name>_reverse`` are auxiliary guide sites inside the data plate, so every Pyro
    ELBO computes the bound and a subsampled plate scales each datum's terms, the reverse
    one included, by N / B. The model's per-datum sites are Delta sites (as in Pyro's
    ``AutoContinuous``), so ``Predictive`` returns posterior draws of them.

    Latent sites outside the data plate (global latents) get a mean-field
    :class:`~pyro.infer.autoguide.AutoNormal` (``init_scale=global_init_scale``); the
    per-datum guide does not condition on them (a valid bound that leaves the posterior
    dependence between ``theta`` and ``z_i`` out).

    Refused with a ``ValueError`` naming the site or plate: a model without the data plate
    or without a latent site in it; discrete latent sites; a per-datum site that also lies
    in a plate outside the data plate; a model with no tensor argument of one row per datum
    (pass ``input_fn``); non-finite inputs.

    How it is trained. The data plate may be written in any of the three ways
    :func:`lvmkit.inference.fit` accepts: ``pyro.plate("data", len(x))`` over the batch,
    ``pyro.plate("data", N, subsample=...)``, or ``pyro.plate("data", N, subsample_size=B)``
    with ``obs=x[ind]`` (the guide then encodes ``x[ind]``). The guide has no per-datum
    parameters, so ``fit`` trains it at B < N in all three. With plain ``SVI`` and a
    subsampled plate the guide's plate draws the indices and the model replays them, as with
    ``AutoNormal``.

    :param model: a Pyro model.
    :param data_plate: name of the model's data plate.
    :param aux_dim: dimension of ``a_i``; default ``D``.
    :param num_components: components of the mixture ``q(a_i | x_i)``.
    :param hidden: hidden sizes of each MLP.
    :param num_aux_samples: ``K >= 0`` reverse draws for the IWHVI estimate. At fixed
        parameters more draws tighten the bound, but training with ``K > 0`` was less
        stable than ``K = 0``: on the bimodal benchmark (``benchmarks/amortized_hvm.py``)
        ``K = 4`` at ``lr=1e-2`` with one particle diverged (the reverse model's scale
        blew up); at ``lr=1e-3`` it was better than ``K = 0`` on one seed and worse on
        another.
    :param dreg: DReG gradients for the reverse model (``K > 0``).
    :param component_spread: standard deviation of the initial mixture locations.
    :param component_scale: initial standard deviation of each mixture component.
    :param noise_scale: initial standard deviations of ``q(u | a, x)`` and ``r(a | u, x)``.
    :param input_fn: ``(*args, **kwargs) -> tensor`` of the encoder inputs, one row per
        datum of the data plate's full size (indexed with the plate's indices) or of its
        current size (taken in order); default: every tensor argument with such rows.
    :param init_loc_fn: per-site initialisation, as in Pyro's autoguides; the initial
        mixture is centred on the mean of the per-datum initial values.
    :param global_init_scale: ``init_scale`` of the global ``AutoNormal``.

    Example: per-datum latents in Pyro's subsampling idiom, trained by ``fit`` at B < N.

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> from lvmkit.guides import AmortizedAutoHVM
    >>> from lvmkit.inference import fit
    >>> x = torch.randn(40)
    >>> def model(x):
    ...     with pyro.plate("data", len(x), subsample_size=10) as ind:
    ...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...         pyro.sample("x", dist.Normal(z, 0.5), obs=x[ind])
    >>> guide = AmortizedAutoHVM(model, hidden=(16,))
    >>> history = fit(model, guide, x, steps=5, batch_size=10, progress=False)
    >>> guide(x)["z"].shape
    torch.Size([10])
    """

    #: no per-datum parameters: ``fit`` trains it on a plate over the batch at B < N
    amortized = True

    def __init__(
        self,
        model: Callable,
        *,
        data_plate: str = "data",
        aux_dim: int | None = None,
        num_components: int = 4,
        hidden: Sequence[int] = (64, 64),
        num_aux_samples: int = 0,
        dreg: bool = True,
        component_spread: float = 1.0,
        component_scale: float = 0.1,
        noise_scale: float = 0.1,
        input_fn: Callable[..., torch.Tensor] | None = None,
        init_loc_fn: Callable = init_to_median,
        global_init_scale: float = 0.1,
    ) -> None:
        if not isinstance(data_plate, str) or not data_plate:
            raise ValueError(f"data_plate must be a non-empty str, got {data_plate!r}")
        if aux_dim is not None:
            check_size(aux_dim, "aux_dim")
        check_size(num_components, "num_components")
        _check_count(num_aux_samples, "num_aux_samples")
        for value, what in [
            (component_scale, "component_scale"),
            (noise_scale, "noise_scale"),
            (global_init_scale, "global_init_scale"),
        ]:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{what} must be a positive number, got {value!r}")
        if not (isinstance(component_spread, (int, float)) and component_spread >= 0):
            raise ValueError(f"component_spread must be >= 0, got {component_spread!r}")
        if input_fn is not None and not callable(input_fn):
            raise TypeError(f"input_fn must be callable or None, got {input_fn!r}")
        super().__init__(InitMessenger(init_loc_fn)(model))
        self._original_model = (model,)
        self.data_plate = data_plate
        self._aux_dim_arg = aux_dim
        self.num_components = num_components
        self.hidden = tuple(check_size(h, "hidden layer size") for h in hidden)
        self.num_aux_samples = num_aux_samples
        self.dreg = bool(dreg)
        self.component_spread = float(component_spread)
        self.component_scale = float(component_scale)
        self.noise_scale = float(noise_scale)
        self.input_fn = input_fn
        self.init_loc_fn = init_loc_fn
        self.global_init_scale = float(global_init_scale)
        self.global_guide: AutoNormal | None = None

    # -- setup --------------------------------------------------------------------------
    def _check_prototype(self, part_trace) -> None:
        """The nested global ``AutoNormal`` reports its prototype here (Pyro's master
        guide protocol); it holds only sites outside the data plate."""

    def _setup_prototype(self, *args, **kwargs) -> None:
        name = type(self).__name__
        try:
            super()._setup_prototype(*args, **kwargs)
        except NotImplementedError as error:  # e.g. a sequential plate
            raise ValueError(f"{name}: {error}") from None
        local, global_ = [], []
        frame = None
        for site_name, site in self.prototype_trace.iter_stochastic_nodes():
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"{name}: latent site {site_name!r} is discrete ({site['fn'].support}); "
                    "enumerate it in the model and hide it from the guide"
                )
            frames = [f for f in site["cond_indep_stack"] if f.name == self.data_plate]
            if frames:
                local.append((site_name, site))
                frame = frames[0]
            else:
                global_.append(site_name)
        if frame is None:
            self._refuse_no_local_site(*args, **kwargs)
        self._frame = frame
        self._subsampled = frame.full_size not in (None, -1, frame.size)
        self._local_sites: list[_LocalSite] = []
        inits, offset = [], 0
        for site_name, site in local:
            value = site["value"].detach()
            unconstrained = biject_to(site["fn"].support).inv(value)
            plate_pos = value.dim() - site["fn"].event_dim + frame.dim
            if plate_pos < 0 or unconstrained.shape[plate_pos] != frame.size:
                raise ValueError(
                    f"{name}: site {site_name!r} has shape {tuple(value.shape)}, without the "
                    f"data plate {self.data_plate!r}'s size {frame.size} at dim {frame.dim}"
                )
            outer = [
                f.name for f in site["cond_indep_stack"] if f.vectorized and f.dim < frame.dim
            ]
            if outer or any(s != 1 for s in unconstrained.shape[:plate_pos]):
                raise ValueError(
                    f"{name}: per-datum site {site_name!r} also lies in plate(s) {outer} "
                    f"outside the data plate {self.data_plate!r} (shape {tuple(value.shape)}):"
                    f" only plates nested inside the data plate are supported; make "
                    f"{self.data_plate!r} the outermost plate of its per-datum sites"
                )
            spec = _LocalSite(site_name, site, plate_pos, offset, unconstrained)
            offset += spec.size
            self._local_sites.append(spec)
            inits.append(unconstrained.reshape(frame.size, spec.size))
        self.latent_dim = offset
        self.aux_dim = self._aux_dim_arg or offset
        self._input_keys = self._find_input_keys(frame, *args, **kwargs)
        inputs = self._raw_inputs(None, *args, **kwargs)
        self.input_dim = inputs.shape[-1]
        init = torch.cat(inits, -1)
        self._build(init, inputs)
        self.to(init.device)
        if global_:
            self.global_guide = AutoNormal(
                poutine.block(self._original_model[0], expose=global_),
                init_loc_fn=self.init_loc_fn,
                init_scale=self.global_init_scale,
            )

    def _refuse_no_local_site(self, *args, **kwargs):
        name = type(self).__name__
        trace = poutine.block(poutine.trace(self._original_model[0]).get_trace)(*args, **kwargs)
        plates = sorted(
            {
                f.name
                for site in trace.nodes.values()
                if site["type"] == "sample"
                for f in site["cond_indep_stack"]
            }
        )
        if self.data_plate not in plates:
            raise ValueError(
                f"{name}: the model has no plate named {self.data_plate!r} (its plates: "
                f"{plates}): put the per-datum sites in pyro.plate({self.data_plate!r}, ...) "
                "or pass data_plate=<name>"
            )
        raise ValueError(
            f"{name}: the model has no latent sample site inside plate {self.data_plate!r}: "
            "nothing is per datum; use AutoNormal or AutoHVM for global latents"
        )

    def _build(self, init: torch.Tensor, inputs: torch.Tensor) -> None:
        dim, aux, comps, x_dim = self.latent_dim, self.aux_dim, self.num_components, self.input_dim
        mean = inputs.mean(0)
        std = inputs.std(0) if inputs.shape[0] > 1 else torch.ones_like(mean)
        std = torch.where(torch.isfinite(std) & (std > 0), std, torch.ones_like(std))
        self.register_buffer("input_mean", mean)
        self.register_buffer("input_std", std)
        self.loc0 = nn.Parameter(init.mean(0))
        self.aux_net = mlp(x_dim, self.hidden, 2 * comps * aux)
        _zero_output(self.aux_net)
        with torch.no_grad():
            bias = self.aux_net[-1].bias.view(2, comps, aux)
            bias[0] = self.component_spread * torch.randn(comps, aux)
            bias[1] = _inverse_softplus(self.component_scale)
        self.shift_net = mlp(x_dim, self.hidden, dim)
        _zero_output(self.shift_net)
        self.noise_net = mlp(aux + x_dim, self.hidden, dim)
        _zero_output(self.noise_net)
        self.reverse_net = mlp(dim + x_dim, self.hidden, 2 * aux)
        _zero_output(self.reverse_net)
        self.register_buffer("projection", torch.eye(dim, aux))
        self._noise_offset = _inverse_softplus(self.noise_scale)

    # -- inputs ---------------------------------------------------------------------------
    def _candidates(self, *args, **kwargs) -> list[tuple[str, object]]:
        if self.input_fn is not None:
            return [("input_fn(...)", self.input_fn(*args, **kwargs))]
        return [(i, a) for i, a in enumerate(args)] + list(kwargs.items())

    def _find_input_keys(self, frame, *args, **kwargs) -> list:
        """At setup: which arguments are per-datum inputs (tensors with one row per datum
        of the plate's full size or of its current size)."""
        name = type(self).__name__
        full = frame.full_size if frame.full_size not in (None, -1) else frame.size
        keys = []
        for key, value in self._candidates(*args, **kwargs):
            if self.input_fn is not None and not torch.is_tensor(value):
                raise TypeError(f"{name}: input_fn must return a tensor, got "
                                f"{type(value).__name__}")
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] in (full, frame.size):
                keys.append(key)
            elif self.input_fn is not None:
                raise ValueError(
                    f"{name}: input_fn returned shape {tuple(value.shape)}, but the data "
                    f"plate {self.data_plate!r} has {full} data ({frame.size} in a batch)"
                )
        if not keys:
            raise ValueError(
                f"{name}: no tensor argument of the model has one row per datum of plate "
                f"{self.data_plate!r} ({full} rows, or {frame.size} in a batch), so the "
                "encoder has nothing to condition on: pass input_fn=(*args, **kwargs) -> "
                "tensor of per-datum inputs"
            )
        return keys

    def _raw_inputs(self, idx, *args, **kwargs) -> torch.Tensor:
        """The per-datum inputs ``(rows, input_dim)``. In a subsampled plate, rows of the
        full size are indexed with ``idx`` (the plate's indices) and rows of the batch's
        size are taken in order; over a plate of the batch, every row in order.
        ``idx=None`` keeps every row."""
        name = type(self).__name__
        frame = self._frame
        found = dict(self._candidates(*args, **kwargs))
        rows = []
        for key in self._input_keys:
            what = key if isinstance(key, str) and key.endswith(")") else f"argument {key!r}"
            value = found.get(key)
            if not torch.is_tensor(value) or value.dim() == 0:
                raise ValueError(f"{name}: {what} was a per-datum tensor at setup, now got "
                                 f"{type(value).__name__}")
            if self._subsampled and idx is not None:
                if value.shape[0] == frame.full_size:
                    value = value[idx.to(value.device)]
                elif value.shape[0] != len(idx):
                    raise ValueError(
                        f"{name}: {what} has {value.shape[0]} rows, but the data plate "
                        f"{self.data_plate!r} has {frame.full_size} data ({len(idx)} in a batch)"
                    )
            rows.append((what, value.reshape(value.shape[0], -1)))
        if len({r.shape[0] for _, r in rows}) > 1:
            raise ValueError(
                f"{name}: the per-datum inputs have different numbers of rows "
                f"{[(w, r.shape[0]) for w, r in rows]}: pass input_fn"
            )
        for what, r in rows:
            if r.is_floating_point() and not bool(torch.isfinite(r).all()):
                raise ValueError(
                    f"{name}: {what} (an encoder input) has non-finite values: pass an "
                    "input_fn that maps them to finite inputs"
                )
        return torch.cat([r.to(torch.get_default_dtype()) for _, r in rows], -1)

    def _inputs(self, idx: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = self._raw_inputs(idx, *args, **kwargs)
        if x.shape[-1] != self.input_dim or x.shape[0] != len(idx):
            raise ValueError(
                f"{type(self).__name__}: the per-datum inputs have shape {tuple(x.shape)}, "
                f"expected ({len(idx)}, {self.input_dim}) as at setup"
            )
        x = (x.to(self.input_mean) - self.input_mean) / self.input_std
        # the data plate's dim: singletons for the plates nested inside it
        return x.reshape((len(idx),) + (1,) * (-self._frame.dim - 1) + (self.input_dim,))

    # -- the hierarchical family ----------------------------------------------------------
    def aux_dist(self, x: torch.Tensor, detach: bool = False) -> EqualMixtureNormal:
        """q(a | x)."""
        out = _apply(self.aux_net, x, detach)
        loc, raw = out.reshape(out.shape[:-1] + (2, self.num_components, self.aux_dim)).unbind(-3)
        return EqualMixtureNormal(loc, F.softplus(raw) + MIN_SCALE)

    def _with_x(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, x.expand(h.shape[:-1] + x.shape[-1:])], -1)

    def conditional(self, a: torch.Tensor, x: torch.Tensor, detach: bool = False):
        """q(u | a, x)."""
        raw = _apply(self.noise_net, self._with_x(a, x), detach)
        loc = self._offset(x, detach) + a @ self.projection.T
        scale = F.softplus(raw + self._noise_offset) + MIN_SCALE
        return dist.Normal(loc, scale).to_event(1)

    def _offset(self, x: torch.Tensor, detach: bool) -> torch.Tensor:
        """``u0 + f(x)``: the part of q(u | a, x)'s location that does not depend on a."""
        loc0 = self.loc0.detach() if detach else self.loc0
        return loc0 + _apply(self.shift_net, x, detach)

    def _reverse_params(self, u: torch.Tensor, x: torch.Tensor, detach: bool = False):
        out = _apply(self.reverse_net, self._with_x(u, x), detach)
        shift, raw = out.chunk(2, -1)
        # q's location inverted exactly, so r follows q as q is learned (sharing q's
        # parameters is fine: r may be any function, and detach=True holds all fixed)
        a_hat = (u - self._offset(x, detach)) @ self.projection
        return a_hat + shift, F.softplus(raw + self._noise_offset) + MIN_SCALE

    def reverse(self, u: torch.Tensor, x: torch.Tensor) -> dist.Distribution:
        """r(a | u, x)."""
        return dist.Normal(*self._reverse_params(u, x)).to_event(1)

    def log_correction(self, a0, u, x, log_q_a0, log_q_u) -> torch.Tensor:
        """``log q̂(u | x) - log q(a0 | x) - log q(u | a0, x)``, the reverse factor."""
        K = self.num_aux_samples
        if K == 0:
            return -self.reverse(u, x).log_prob(a0)

        def log_joint(a, detach):
            u_ = u.detach() if detach else u
            log_q_a = self.aux_dist(x, detach).log_prob(a)
            return log_q_a + self.conditional(a, x, detach).log_prob(u_)

        log_joint_a0 = log_q_a0 + log_q_u
        log_q_hat = iwhvi_log_q_hat(
            log_joint,
            lambda u_, detach: self._reverse_params(u_, x, detach),
            a0,
            u,
            K,
            dreg=self.dreg,
            log_joint_a0=log_joint_a0,
        )
        return log_q_hat - log_joint_a0

    # -- the guide ------------------------------------------------------------------------
    def _create_plates(self, *args, **kwargs):
        self.plates = {}
        frame = self._frame
        for name, f in sorted(self._prototype_frames.items()):
            if name == self.data_plate:
                continue
            self.plates[name] = pyro.plate(
                name, f.full_size or f.size, dim=f.dim, subsample_size=f.size
            )
        if self._subsampled:
            plate = pyro.plate(
                self.data_plate, frame.full_size, dim=frame.dim, subsample_size=frame.size
            )
        else:
            # a plate over the batch: its size is this call's number of data
            rows = self._raw_inputs(None, *args, **kwargs).shape[0]
            plate = pyro.plate(self.data_plate, rows, dim=frame.dim)
        self.plates[self.data_plate] = plate
        return self.plates

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Sample the guide; returns the model's latent values by site name."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        if self.global_guide is not None:
            result.update(self.global_guide(*args, **kwargs))
        prefix = f"_{self._pyro_name}"
        with plates[self.data_plate] as idx:
            x = self._inputs(idx, *args, **kwargs)
            q_a = self.aux_dist(x)
            a0 = pyro.sample(f"{prefix}_aux", q_a, infer={"is_auxiliary": True})
            q_u = self.conditional(a0, x)
            u = pyro.sample(f"{prefix}_latent", q_u, infer={"is_auxiliary": True})
            if self.num_aux_samples == 0:
                correction = self.log_correction(a0, u, x, None, None)
            else:
                correction = self.log_correction(a0, u, x, q_a.log_prob(a0), q_u.log_prob(u))
            reverse_factor(f"{prefix}_reverse", correction, [f"{prefix}_aux"])
            lead = u.shape[: u.dim() + self._frame.dim - 1]  # e.g. vectorized particles
            batch = len(idx)
            for spec in self._local_sites:
                part = u[..., spec.offset : spec.offset + spec.size]
                unconstrained = part.reshape(lead + (batch,) + spec.rest_shape)
                transform = biject_to(spec.fn.support)
                value = transform(unconstrained)
                log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
                log_density = sum_rightmost(
                    log_density, log_density.dim() - value.dim() + spec.event_dim
                )
                with ExitStack() as stack:
                    for f in spec.frames:
                        if f.name != self.data_plate:
                            stack.enter_context(plates[f.name])
                    # u is a bijection of the model's values: the Delta sites' log-Jacobians
                    # account for it exactly (what check_auxiliary_guide looks for)
                    result[spec.name] = pyro.sample(
                        spec.name,
                        dist.Delta(value, log_density=log_density, event_dim=spec.event_dim),
                        infer={"reverse_for": (f"{prefix}_latent",)},
                    )
        return result
