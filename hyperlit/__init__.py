"""hyperlit: PyTorch Lightning modules for meta-learning with hypernetworks.

* :mod:`hyperlit.tuning` — Self-Tuning Networks and best-response hypernetworks (hyperparameter optimization).
* :mod:`hyperlit.pareto` — Pareto HyperNetworks (multi-objective optimization).
* :mod:`hyperlit.continual` — task-conditioned hypernetworks (continual learning).
* :mod:`hyperlit.nn` — the Lightning-free parts: hypernetworks, STN layers, regularizers, augmentation.

Every LightningModule of the library subclasses :class:`~hyperlit.base.HyperlitModule`;
:class:`~hyperlit.cli.HyperlitCLI` is the ``hyperlit`` command line (a ``LightningCLI`` over them).
"""

from hyperlit.base import HyperlitModule
from hyperlit.cli import HyperlitCLI
from hyperlit.hparams import Hyperparameter, HyperparameterSpace

__version__ = "0.1.0"
__all__ = ["HyperlitCLI", "HyperlitModule", "Hyperparameter", "HyperparameterSpace", "__version__"]
