"""hyperlit's LightningDataModules, exported here so configs can name them as ``datamodules.MNISTDataModule`` etc.

Conventions shared by all of them (data location, downloads, errors, seeded splits, mid-epoch resume):
:mod:`datamodules.base`.
"""

from datamodules.base import (
    DataFormatError,
    DatasetNotFoundError,
    HyperlitDataModule,
    default_data_dir,
)
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.continual_mnist import PermutedMNISTDataModule, SplitMNISTDataModule
from datamodules.digits import DigitsDataModule
from datamodules.mnist import MNISTDataModule
from datamodules.multi_mnist import MultiMNISTDataModule
from datamodules.ptb import PTBDataModule
from datamodules.regression1d import Regression1DDataModule
from datamodules.split_cifar import SplitCIFAR10DataModule
from datamodules.tabular import AdultDataModule, BankDataModule, DefaultDataModule, TabularFairnessDataModule
from datamodules.task_sequence import TaskSequenceDataModule

__all__ = [
    "AdultDataModule",
    "BankDataModule",
    "CIFAR10DataModule",
    "DataFormatError",
    "DatasetNotFoundError",
    "DefaultDataModule",
    "DigitsDataModule",
    "HyperlitDataModule",
    "MNISTDataModule",
    "MultiMNISTDataModule",
    "PTBDataModule",
    "PermutedMNISTDataModule",
    "Regression1DDataModule",
    "SplitCIFAR10DataModule",
    "SplitMNISTDataModule",
    "TabularFairnessDataModule",
    "TaskSequenceDataModule",
    "default_data_dir",
]
