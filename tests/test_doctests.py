"""The ``Example`` sections of the public docstrings run and print what they say.

Each module's doctests run in one ``doctest.testmod`` call, from a fresh param store and a
fixed seed (examples of one module share the param store, as a reader's session would).
``attempted > 0`` makes a module that loses its examples fail here.
"""

import doctest
import importlib
import inspect

import pyro
import pytest
import torch
import torch.distributed as dist

MODULES = [
    "lvmkit",
    "lvmkit.data",
    "lvmkit.workflow",
    "lvmkit.nn",
    "lvmkit.models.vae",
    "lvmkit.models.sbn",
    "lvmkit.models.categorical",
    "lvmkit.models.two_layer",
    "lvmkit.models.semi_supervised",
    "lvmkit.models.registry",
    "lvmkit.guides.encoders",
    "lvmkit.guides.hierarchical",
    "lvmkit.guides.amortized",
    "lvmkit.models.targets",
    "lvmkit.models.target_suite",
    "lvmkit.inference.training",
    "lvmkit.inference.evaluate",
    "lvmkit.inference.arviz_compat",
    "lvmkit.inference.arviz_export",
    "lvmkit.inference.psis",
    "lvmkit.inference.nuts",
    "lvmkit.inference.registry",
    "lvmkit.inference.compare",
    "lvmkit.inference.check",
    "lvmkit.inference.distributed",
    "lvmkit.inference.plots",
    "lvmkit.inference.estimators",
    "lvmkit.inference.estimators.sites",
    "lvmkit.inference.estimators.nvil",
    "lvmkit.inference.estimators.vimco",
    "lvmkit.inference.estimators.arm",
    "lvmkit.inference.estimators.rebar",
    "lvmkit.inference.estimators.variance",
    "lvmkit.inference.estimators.relax",
    "lvmkit.inference.estimators.concrete",
    "lvmkit.inference.estimators.rloo",
    "lvmkit.inference.estimators.double_cv",
    "lvmkit.inference.estimators.rodeo",
    "lvmkit.inference.estimators.disarm_categorical",
]

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    module = importlib.import_module(name)  # before the chdir, while cwd's lvmkit is found
    # examples that write files (run folders, checkpoints) write them here
    monkeypatch.chdir(tmp_path)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    try:
        result = doctest.testmod(module, optionflags=FLAGS, report=True)
    finally:
        # the distributed examples open a one-rank process group; a failure between its
        # init and destroy must not leave it to the tests that follow (fit would join it)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


PACKAGES = ["lvmkit.models", "lvmkit.guides", "lvmkit.inference", "lvmkit.data", "lvmkit.workflow"]


def public_objects(package: str) -> list[tuple[str, object]]:
    """The classes and functions a package exports (its ``__all__``)."""
    module = importlib.import_module(package)
    objects = [(name, getattr(module, name)) for name in module.__all__]
    return [(n, o) for n, o in objects if inspect.isclass(o) or inspect.isfunction(o)]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_class_and_function_has_an_example_that_runs_here(package):
    """An example that runs: one in the docstring, in a module that the test above runs."""
    objects = public_objects(package)
    assert objects, package
    lacking = [
        f"{name} ({obj.__module__})"
        for name, obj in objects
        if ">>>" not in (obj.__doc__ or "") or obj.__module__ not in MODULES
    ]
    assert not lacking, f"{package} exports these without a doctested Example: {lacking}"
