"""The estimators after REBAR on binary VAEs, dynamically binarized Fashion-MNIST.

    python benchmarks/modern.py [--steps N] [--quick] [--models linear,nonlinear]
                                [--out results/bench_modern.json]

The protocol of the DisARM (Dong et al. 2020), Double CV (Titsias & Shi 2022) and RODEO
(Shi et al. 2022) code: 200 Bernoulli latents; a linear (784-200) or nonlinear
(784-200-200-200 with LeakyReLU(0.3), and back) encoder and decoder; learned prior logits;
Adam (1e-3, the code's default for model, encoder and controls); batches of 100;
dynamically binarized Fashion-MNIST (Debian's ``dataset-fashion-mnist``; ``make
bench-modern`` installs it). The decoder's output bias starts at the logit of the training
pixel means, as in that code.

At equal model evaluations per datum, every estimator is trained from the same
initialisation on the same batches (and the same binarization draws): K = 2: RLOO, Double
CV, RODEO, DisARM (one antithetic pair); K = 3: RLOO, Double CV, RODEO, RELAX and REBAR
(one hard and two relaxed passes). DisARM needs an even number of evaluations and is not
run at K = 3. Reported for each:

- ``log10_var``: log10 of the variance of the encoder-parameter gradient (mean over
  coordinates, ``--var-draws`` draws on one fixed batch), at fixed step snapshots, with the
  estimator's own learned controls at that step;
- the training ELBO per datum over steps (its running mean over ``--smooth`` steps);
- test ELBO (one sample per image, the whole 10,000-image test set, one fixed binarization)
  and test IWAE bound with ``--iwae-samples`` (1000) samples on the first ``--iwae-images``
  test images;
- ms per step (median).

The papers train for 1M steps; the default here is a few hundred, so the ELBOs are early
training values and the comparison is of orderings, chiefly of variance.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _report import write_report  # noqa: E402

LATENT, PIXELS, HIDDEN = 200, 784, 200


def networks(nonlinear: bool, bias: torch.Tensor, seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    if nonlinear:
        encoder = nn.Sequential(
            nn.Linear(PIXELS, HIDDEN), nn.LeakyReLU(0.3), nn.Linear(HIDDEN, HIDDEN),
            nn.LeakyReLU(0.3), nn.Linear(HIDDEN, LATENT),
        )
        decoder = nn.Sequential(
            nn.Linear(LATENT, HIDDEN), nn.LeakyReLU(0.3), nn.Linear(HIDDEN, HIDDEN),
            nn.LeakyReLU(0.3), nn.Linear(HIDDEN, PIXELS),
        )
    else:
        encoder, decoder = nn.Linear(PIXELS, LATENT), nn.Linear(LATENT, PIXELS)
    with torch.no_grad():
        decoder_out = decoder[-1] if nonlinear else decoder
        decoder_out.bias.copy_(bias)
    return encoder, decoder


class BinaryVAE:
    """The model and guide, as a Pyro user would write them."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        self.encoder, self.decoder = encoder, decoder

    def model(self, x: torch.Tensor) -> None:
        decoder = pyro.module("decoder", self.decoder)
        prior = pyro.param("prior_logits", torch.zeros(LATENT))
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(logits=prior).expand([x.shape[0], LATENT])
                            .to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(b)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        encoder = pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=encoder(x)).to_event(1))

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        """``log p(x, b) - log q(b | x)`` for ``samples`` draws per image: (samples, N)."""
        b = dist.Bernoulli(logits=self.encoder(x)).to_event(1).sample((samples,))
        return self.log_weight(x, b)

    @torch.no_grad()
    def log_weight(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``log p(x, b) - log q(b | x)`` at given latents ``b`` (..., N, 200)."""
        q = dist.Bernoulli(logits=self.encoder(x)).to_event(1)
        prior = dist.Bernoulli(logits=pyro.param("prior_logits").detach()).to_event(1)
        likelihood = dist.Bernoulli(logits=self.decoder(b)).to_event(1)
        return likelihood.log_prob(x) + prior.log_prob(b) - q.log_prob(b)


def estimators(k: int) -> dict:
    from lvmkit.inference import RLOOELBO, DoubleCVELBO, RodeoELBO

    line_up = {
        f"rloo-k{k}": lambda: RLOOELBO(num_particles=k, max_plate_nesting=1),
        f"double-cv-k{k}": lambda: DoubleCVELBO(num_particles=k, max_plate_nesting=1),
        f"rodeo-k{k}": lambda: RodeoELBO(num_particles=k, max_plate_nesting=1),
    }
    if k == 2:
        from lvmkit.inference import DisARMELBO

        line_up["disarm-k2"] = lambda: DisARMELBO(max_plate_nesting=1)
    if k == 3:
        from lvmkit.inference import RebarELBO, RelaxELBO

        line_up["relax-k3"] = lambda: RelaxELBO(max_plate_nesting=1)
        line_up["rebar-k3"] = lambda: RebarELBO(max_plate_nesting=1)
    return line_up


def encoder_gradient_variance(vae, elbo, x: torch.Tensor, draws: int, seed: int
                              ) -> tuple[float, float]:
    """log10 mean per-coordinate variance of the encoder gradient, ``draws`` estimates on
    ``x``, through ``differentiable_loss`` (which steps nothing), and its jackknife
    standard error."""
    params = list(vae.encoder.parameters())
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    grads = []
    for _ in range(draws):
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        flat = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(flat, params, strict=True)
        ]))
    torch.set_rng_state(state)
    stacked = torch.stack(grads)
    value = math.log10(float(stacked.var(0).mean()))
    # jackknife standard error over the draws
    n = stacked.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool)
    loo = torch.tensor([math.log10(float(stacked[keep[i]].var(0).mean())) for i in range(n)])
    return value, float(((n - 1) / n * ((loo - loo.mean()) ** 2).sum()).sqrt())


def run_one(label, make_elbo, nonlinear, data, args) -> dict:
    train, test_x, iwae_x, fixed_x, bias = data
    pyro.clear_param_store()
    encoder, decoder = networks(nonlinear, bias, args.seed)
    vae = BinaryVAE(encoder, decoder)
    elbo = make_elbo()
    controls = getattr(elbo, "module_name", None)

    def learning_rate(module_name, param_name):
        # Double CV / RODEO controls are trained by this optimizer (REBAR / RELAX have
        # their own, at their default rate)
        return {"lr": args.control_lr if module_name == controls else args.lr}

    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam(learning_rate), elbo)
    order = torch.Generator().manual_seed(args.seed)
    pixels = torch.Generator().manual_seed(args.seed + 1)
    pyro.set_rng_seed(args.seed + 2)
    snapshots = sorted({0, args.steps // 2, args.steps})
    curve, times, variance, variance_se = [], [], {}, {}
    perm, cursor = torch.randperm(len(train), generator=order), 0
    for step in range(args.steps + 1):
        if step in snapshots:
            measured = copy.deepcopy(elbo) if step == 0 else elbo
            variance[step], variance_se[step] = encoder_gradient_variance(
                vae, measured, fixed_x, args.var_draws, args.seed + 3
            )
        if step == args.steps:
            break
        if cursor + args.batch_size > len(perm):
            perm, cursor = torch.randperm(len(train), generator=order), 0
        x = train.batch(perm[cursor:cursor + args.batch_size], pixels)
        cursor += args.batch_size
        start = time.perf_counter()
        loss = svi.step(x)
        times.append(time.perf_counter() - start)
        curve.append(-loss / args.batch_size)
    with torch.no_grad():
        test_elbo = float(torch.cat([vae.log_weights(c, 1)[0] for c in test_x.split(1000)]).mean())
        lw = torch.cat([vae.log_weights(iwae_x, args.iwae_samples)], 1)
        iwae = float((torch.logsumexp(lw, 0) - math.log(args.iwae_samples)).mean())
    smooth = max(1, min(args.smooth, len(curve)))
    running = [statistics.fmean(curve[max(0, i + 1 - smooth):i + 1]) for i in range(len(curve))]
    result = {
        "train_elbo": running[-1],
        "train_elbo_curve": running[:: max(1, len(running) // 20)] + [running[-1]],
        "test_elbo": test_elbo,
        f"test_iwae_{args.iwae_samples}": iwae,
        "log10_var": {str(s): v for s, v in variance.items()},
        "log10_var_se": {str(s): v for s, v in variance_se.items()},
        "ms_per_step": 1000 * statistics.median(times),
    }
    if hasattr(elbo, "controls") and isinstance(elbo.controls, nn.ModuleDict):
        # Double CV / RODEO: where their learned scalars got to
        result["controls"] = {
            f"{site}.{name}": float(p.detach())
            for site, control in elbo.controls.items()
            for name, p in control.named_parameters() if p.dim() == 0
        }
    print(f"  {label:14s} train {result['train_elbo']:8.2f}  test {test_elbo:8.2f}  "
          f"iwae {iwae:8.2f}  log10 var {', '.join(f'{v:6.2f}' for v in variance.values())}"
          f"  {result['ms_per_step']:6.1f} ms/step", flush=True)
    return result


def load_data(args):
    from lvmkit.data import load_fashion_mnist

    train = load_fashion_mnist("train", binarize="dynamic")
    test = load_fashion_mnist("test", binarize="dynamic")
    fixed = torch.Generator().manual_seed(args.seed + 4)
    test_x = torch.bernoulli(test.x[: args.test_images], generator=fixed)
    iwae_x = test_x[: args.iwae_images]
    fixed_x = torch.bernoulli(train.x[: args.batch_size], generator=fixed)
    mean = train.x.mean(0).clamp(1e-3, 1 - 1e-3)
    bias = torch.log(mean) - torch.log1p(-mean)
    return train, test_x, iwae_x, fixed_x, bias


def table(report: dict) -> str:
    iwae_key = f"test_iwae_{report['iwae_samples']}"
    lines = [
        f"Fashion-MNIST (dynamic binarization), 200 Bernoulli latents, batch "
        f"{report['batch_size']}, Adam {report['lr']} (controls {report['control_lr']}), "
        f"{report['steps']} steps, seed "
        f"{report['seed']}; log10 encoder-gradient variance at steps "
        f"{', '.join(report['snapshots'])} ({report['var_draws']} draws, ± jackknife "
        f"standard error); test ELBO on "
        f"{report['test_images']} test images, IWAE-{report['iwae_samples']} on "
        f"{report['iwae_images']}.",
        "",
        "| model | estimator | evals/datum | log10 var (" + ", ".join(report["snapshots"])
        + ") | train ELBO | test ELBO | test IWAE | ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, runs in report["results"].items():
        for label, r in runs.items():
            se = r.get("log10_var_se", {})
            var = ", ".join(
                f"{v:.2f}" + (f" ± {se[s]:.2f}" if s in se else "")
                for s, v in r["log10_var"].items()
            )
            k = label.rsplit("-k", 1)[1]
            lines.append(
                f"| {model} | {label.rsplit('-k', 1)[0]} | {k} | {var} | {r['train_elbo']:.2f} "
                f"| {r['test_elbo']:.2f} | {r[iwae_key]:.2f} | {r['ms_per_step']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a smoke test (about a minute)")
    parser.add_argument("--models", default="linear,nonlinear")
    parser.add_argument("--ks", default="2,3")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--control-lr", type=float, default=1e-3,
                        help="Adam rate of the Double CV / RODEO controls (paper: 1e-3)")
    parser.add_argument("--var-draws", type=int, default=20)
    parser.add_argument("--smooth", type=int, default=50)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--iwae-images", type=int, default=100)
    parser.add_argument("--iwae-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_modern.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.var_draws, args.test_images = 6, 3, 500
        args.iwae_images, args.iwae_samples, args.smooth = 10, 50, 3
        args.out = args.out.replace(".json", "_quick.json")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = load_data(args)
    results = {}
    for model in args.models.split(","):
        results[model] = {}
        for k in (int(k) for k in args.ks.split(",")):
            print(f"{model}, K = {k}", flush=True)
            for label, make in estimators(k).items():
                results[model][label] = run_one(label, make, model == "nonlinear", data, args)
    report = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "control_lr": args.control_lr,
        "seed": args.seed,
        "snapshots": [str(s) for s in sorted({0, args.steps // 2, args.steps})],
        "var_draws": args.var_draws, "test_images": args.test_images,
        "iwae_images": args.iwae_images, "iwae_samples": args.iwae_samples,
        "device": "cpu", "threads": torch.get_num_threads(), "results": results,
    }
    write_report(report, args.out, table(report))


if __name__ == "__main__":
    main()
