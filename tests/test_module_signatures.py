"""Every hyperlit module's signature works with LightningCLI: optimizer defaults print as class_path/init_args."""

from __future__ import annotations

import inspect

import pytest
import yaml
from jsonargparse import ArgumentParser

from hyperlit.base import HyperlitModule
from hyperlit.cli import import_all

import_all()


def _modules() -> list[type[HyperlitModule]]:
    found: set[type[HyperlitModule]] = set()
    todo = [HyperlitModule]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("hyperlit.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return sorted(found, key=lambda k: k.__qualname__)


def _factories(cls: type) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters if n.endswith(("optimizer", "lr_scheduler"))]


def test_every_concrete_module_takes_optimizer_factories() -> None:
    with_factories = {cls.__name__ for cls in _modules() if _factories(cls)}
    for name in ("SelfTuningModule", "BestResponseModule", "ParetoHyperNetModule", "HyperContinualModule"):
        # SelfTuningModule forwards them to BilevelModule (**kwargs): LightningCLI resolves those too
        assert name in with_factories or name == "SelfTuningModule"
    assert {"BilevelModule", "EWCContinualModule", "FixedHyperparameterModule"} <= with_factories


@pytest.mark.parametrize("cls", [c for c in _modules() if _factories(c)], ids=lambda c: c.__name__)
def test_optimizer_defaults_print_as_config(cls: type) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "model", fail_untyped=False, skip={"net", "target"})
    dumped = parser.dump(parser.get_defaults(), skip_validation=True)
    assert "Unable to serialize" not in dumped
    config = yaml.safe_load(dumped)["model"]
    for name in _factories(cls):
        value = config.get(name)  # a None default is not dumped
        if name.endswith("lr_scheduler") and value is None:
            continue  # no schedule by default
        assert value["class_path"].startswith("torch.optim."), (name, value)
        assert "lr" in value["init_args"] or name.endswith("lr_scheduler")
