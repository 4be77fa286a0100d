"""Hyperparameter search (`tailor tune`): the space from `tune.space`, Optuna samplers and pruners, trials that
train and evaluate with the same core as `tailor train` and `tailor eval`."""

from tailor.tune.search import TuneResult, open_study, run_tune

__all__ = ["TuneResult", "open_study", "run_tune"]
