"""The shared layers of lvmkit.nn, and the pairing of models with guides in models.build."""

import subprocess
import sys

import pytest
import torch
from pyro import poutine

from lvmkit.guides import encoders
from lvmkit.models import MODEL_NAMES, build
from lvmkit.models.registry import default_guide
from lvmkit.models.vae import BernoulliImageModel
from lvmkit.nn import MIN_SCALE, check_size, gaussian_params, mlp


def test_models_do_not_import_the_guides():
    """The generative side builds on lvmkit.nn, not on the inference side."""
    code = (
        "import sys, lvmkit.models.vae, lvmkit.models.sbn, lvmkit.models.categorical,"
        " lvmkit.models.two_layer, lvmkit.models.semi_supervised, lvmkit.models.registry;"
        " print(sorted(m for m in sys.modules if m.startswith('lvmkit.guides')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_encoders_reexport_the_shared_layers():
    assert encoders.mlp is mlp and encoders.check_size is check_size
    assert encoders.gaussian_params is gaussian_params and encoders.MIN_SCALE == MIN_SCALE


def test_mlp_and_gaussian_params():
    net = mlp(5, (7, 3), 4)
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [7, 3, 4]
    loc, scale = gaussian_params(torch.full((2, 6), -1e4))
    assert loc.shape == scale.shape == (2, 3) and bool((scale >= MIN_SCALE).all())
    with pytest.raises(ValueError, match="hidden layer size must be a positive integer"):
        mlp(5, (0,), 2)
    with pytest.raises(ValueError, match="x_dim must be a positive integer, got True"):
        check_size(True, "x_dim")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_pairs_each_model_with_its_encoder(name):
    model, guide = build(name, 64)
    assert type(guide) is type(model.default_guide())  # the thin method still works
    assert guide._pyro_name == f"{model._pyro_name}_guide"
    x = torch.bernoulli(torch.full((3, 64), 0.5))
    guide_trace = poutine.trace(guide).get_trace(x)
    latents = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample"} - {"data"}
    model_sites = poutine.trace(model).get_trace(x).nodes
    assert latents and latents <= set(model_sites)


def test_default_guide_refuses_an_unknown_model():
    class Mine(BernoulliImageModel):
        pass

    with pytest.raises(TypeError, match="no default guide for Mine"):
        default_guide(Mine(4, "mine"))
