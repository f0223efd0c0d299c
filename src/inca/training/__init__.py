"""Parallel training of adapter banks, selection on validation, ensembling."""

from inca.training.bank import AdapterBank, MemberSpec, TrainingError, plan_members
from inca.training.config import ConfigError, FitConfig
from inca.training.fit import fit
from inca.training.loop import train_bank
from inca.training.report import FitReport

__all__ = [
    "AdapterBank",
    "ConfigError",
    "FitConfig",
    "FitReport",
    "MemberSpec",
    "TrainingError",
    "fit",
    "plan_members",
    "train_bank",
]
