"""A guide's posterior against NUTS on the same model: :func:`compare_with_nuts`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyro
import torch

from lvmkit.inference import arviz_compat, plots
from lvmkit.inference._draws import Draws, SiteDraws, draw, pad_batch, plate_frames
from lvmkit.inference.arviz_export import ArvizData, draws_to_tree, site_layout
from lvmkit.inference.psis import MIN_PSIS_DRAWS, KhatResult, khat_from

if TYPE_CHECKING:  # pragma: no cover
    import pandas

__all__ = ["NutsComparison", "compare_with_nuts"]


@dataclass
class NutsComparison:
    """Guide posterior against NUTS on the same model.

    ``table`` has MultiIndex columns ``("guide" | "nuts", stat)`` and one row per scalar
    latent component, plus ``("diff", "z")`` = (mean_guide - mean_nuts) / sd_nuts.

    Example: see :func:`compare_with_nuts`; the table's column groups and rows:

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> y = torch.tensor([0.5, 1.0, 1.5])
    >>> from pyro.infer.autoguide import AutoNormal
    >>> from lvmkit.inference import compare_with_nuts
    >>> comparison = compare_with_nuts(model, AutoNormal(model), y, num_samples=30, warmup=30)
    >>> list(comparison.table.columns.get_level_values(0).unique()), list(comparison.table.index)
    (['guide', 'nuts', 'diff'], ['mu'])
    >>> comparison.khat.num_samples, comparison.plot_path is None
    (30, True)
    """

    table: pandas.DataFrame
    guide_summary: pandas.DataFrame
    nuts_summary: pandas.DataFrame
    khat: KhatResult
    guide_posterior: ArvizData
    nuts_posterior: ArvizData
    divergences: int
    plot_path: str | None = None

    def __str__(self) -> str:
        columns = [(who, stat) for who in ("guide", "nuts") for stat in ("mean", "sd")]
        shown = self.table[columns + [("diff", "z")]]
        return f"{shown.to_string()}\n{self.khat}\nNUTS divergences: {self.divergences}" + (
            f"\nplot: {self.plot_path}" if self.plot_path else ""
        )


def _run_nuts(
    model: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    warmup: int,
    num_chains: int,
    seed: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """Chains run one after the other in this process (seeds ``seed + c``): Pyro's
    multi-chain MCMC forks processes, which buys nothing on a small model."""
    from pyro.infer import MCMC, NUTS

    chains: dict[str, list[torch.Tensor]] = {}
    divergences = 0
    for chain in range(num_chains):
        pyro.set_rng_seed(seed + chain)
        mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
        mcmc.run(*args, **kwargs)
        for name, values in mcmc.get_samples().items():
            chains.setdefault(name, []).append(values)
        divergences += sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values())
    return {name: torch.stack(values) for name, values in chains.items()}, divergences


def _nuts_tree(samples: dict[str, torch.Tensor], draws: Draws) -> ArvizData:
    """NUTS draws, laid out and named exactly like the guide's posterior group."""
    plates = draws.num_plate_dims
    posterior, dims, coords = {}, {}, {}
    for name in draws.roles.latent:
        chains = samples[name]
        num_chains, num_draws = chains.shape[:2]
        site = draws.probe_model.nodes[name]
        event_dim = site["fn"].event_dim
        flat = chains.reshape((num_chains * num_draws,) + tuple(chains.shape[2:]))
        padded = torch.stack([pad_batch(v, event_dim, plates) for v in flat])
        array, dims[name], site_coords = site_layout(
            name, SiteDraws(padded, plate_frames(site), event_dim), plates
        )
        posterior[name] = array.reshape((num_chains, num_draws) + array.shape[1:])
        coords.update(site_coords)
    return arviz_compat.from_groups({"posterior": posterior}, dims=dims, coords=coords)


def _merge_summaries(guide: pandas.DataFrame, nuts: pandas.DataFrame) -> pandas.DataFrame:
    import pandas

    table = pandas.concat({"guide": guide, "nuts": nuts}, axis=1)
    table[("diff", "z")] = (table[("guide", "mean")] - table[("nuts", "mean")]) / table[
        ("nuts", "sd")
    ]
    return table


def compare_with_nuts(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 500,
    warmup: int = 300,
    num_chains: int = 1,
    seed: int = 0,
    plot_path: str | None = None,
    plot_backend: str = "arviz",
    **kwargs: Any,
) -> NutsComparison:
    """Check a guide against Pyro's NUTS on a small model with global latents.

    Runs NUTS (Hoffman & Gelman 2014) with ``warmup`` adaptation steps and ``num_samples``
    draws per chain, draws ``num_samples`` from the guide, and returns both ArviZ summaries
    (mean, sd, interval, ESS, R-hat, MCSE) side by side, the PSIS k-hat of the guide draws
    (Yao et al. 2018), and optionally a forest plot of both posteriors at ``plot_path``.
    The global RNG state is restored afterwards.

    :param plot_backend: ``"arviz"`` (the installed ArviZ's ``plot_forest``; falls back to
        matplotlib with a warning if it fails) or ``"matplotlib"``.

    Example: a guide fitted for 100 steps against 50 NUTS draws (use the defaults, or
    more, for a real check).

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> y = torch.tensor([0.5, 1.0, 1.5])
    >>> from pyro.infer.autoguide import AutoNormal
    >>> from lvmkit.inference import compare_with_nuts, fit
    >>> guide = AutoNormal(model)
    >>> history = fit(model, guide, y, steps=100, batch_size=3,
    ...               optim=pyro.optim.Adam({"lr": 0.05}), progress=False)
    >>> comparison = compare_with_nuts(model, guide, y, num_samples=50, warmup=50)
    >>> print(comparison)
           guide                nuts                diff
            mean        sd      mean        sd         z
    mu  ...
    PSIS k-hat = ... from 50 draws, ESS ...
    NUTS divergences: ...
    """
    if plot_backend not in ("arviz", "matplotlib"):
        raise ValueError(f"plot_backend must be 'arviz' or 'matplotlib', got {plot_backend!r}")
    if num_chains < 1 or num_samples < MIN_PSIS_DRAWS or warmup < 0:
        raise ValueError(
            f"need num_chains >= 1, num_samples >= {MIN_PSIS_DRAWS}, warmup >= 0; got"
            f" {num_chains},"
            f" {num_samples}, {warmup}"
        )
    state = pyro.util.get_rng_state()
    try:
        pyro.set_rng_seed(seed)
        draws = draw(model, guide, args, kwargs, num_samples)
        guide_tree = draws_to_tree(draws)
        samples, divergences = _run_nuts(model, args, kwargs, num_samples, warmup, num_chains, seed)
    finally:
        pyro.util.set_rng_state(state)
    nuts_tree = _nuts_tree(samples, draws)
    names = list(draws.roles.latent)
    guide_summary = arviz_compat.summary(guide_tree, names)
    nuts_summary = arviz_compat.summary(nuts_tree, names)
    table = _merge_summaries(guide_summary, nuts_summary)
    if plot_path is not None:
        plot_path = str(
            plots.plot_forest(
                table,
                plot_path,
                posteriors={"guide": guide_tree, "nuts": nuts_tree},
                var_names=names,
                backend=plot_backend,
            )
        )
    return NutsComparison(
        table=table,
        guide_summary=guide_summary,
        nuts_summary=nuts_summary,
        khat=khat_from(draws.log_p, draws.log_q),
        guide_posterior=guide_tree,
        nuts_posterior=nuts_tree,
        divergences=divergences,
        plot_path=plot_path,
    )
