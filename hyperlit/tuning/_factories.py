"""Default optimizer and scheduler factories that survive pickling (``ddp_spawn`` pickles the module) and checkpoints.

The defaults of the tuning modules' ``*_optimizer`` arguments are lambdas, because jsonargparse turns a lambda
default into ``class_path``/``init_args`` (``--print_config`` shows the optimizer and ``--model.phi_optimizer.lr``
edits it). Lambdas cannot be pickled, so a module keeps a default as a :class:`DefaultFactory`, a reference to the
``__init__`` parameter whose default it is; the lambda is looked up again after unpickling. Factories given by the
caller (functools.partial, jsonargparse's callables, named functions) are kept as they are.

Factories given in Python are not saved in a checkpoint's hyperparameters (:func:`drop_factory_hparams`): Lightning
resumes with ``torch.load(weights_only=True)``, which refuses a pickled ``functools.partial``. Under ``hyperlit
fit`` the hyperparameters are the parsed config (``class_path``/``init_args``, plain data) and stay.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["DefaultFactory", "drop_factory_hparams", "picklable_factory"]


class DefaultFactory:
    """The default value of parameter ``name`` of ``owner.__init__``, called through (pickled by reference)."""

    def __init__(self, owner: type, name: str) -> None:
        self.owner = owner
        self.name = name

    def resolve(self) -> Callable[..., Any]:
        """The default itself (the lambda of the signature)."""
        return inspect.signature(self.owner.__init__).parameters[self.name].default

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"DefaultFactory({self.owner.__qualname__}.{self.name})"


def picklable_factory(module: object, factory: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """``factory``, or a :class:`DefaultFactory` when it is an unpicklable ``__init__`` default of ``module``'s class
    hierarchy (the lambdas of the signatures)."""
    if factory is None:
        return None
    try:
        pickle.dumps(factory)
        return factory
    except Exception:  # lambdas, local functions
        pass
    for cls in type(module).__mro__:
        init = vars(cls).get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if param.default is factory:
                return DefaultFactory(cls, name)
    return factory  # the caller's own lambda: fine in one process; ``ddp_spawn`` needs a picklable one


def drop_factory_hparams(module: Any) -> None:
    """Remove hyperparameters holding Python callables (optimizer/scheduler factories) from what
    ``save_hyperparameters`` recorded: a checkpoint must load with ``torch.load(weights_only=True)``.
    ``load_from_checkpoint`` then uses the defaults unless the factories are given again."""
    for store in (getattr(module, "_hparams", None), getattr(module, "_hparams_initial", None)):
        if store is None:
            continue
        for key in [k for k, v in store.items() if callable(v) and not isinstance(v, nn.Module)]:
            del store[key]
