"""Optional experiment trackers (TensorBoard, MLflow, Weights & Biases) for the metrics the loop writes.

accelerate already speaks to each of them (run start, hyperparameters, scalars per step, only on the main
process), so this module only checks that the chosen tracker's package is installed — before any model loads —
and flattens the config into the scalars trackers accept.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from tailor.errors import TailorError

# tracker name in train.report_to -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check(report_to: Sequence[str]) -> None:
    for name in report_to:
        if name not in TRACKERS:
            raise TailorError(f"train.report_to: unknown tracker '{name}' (choose from {', '.join(TRACKERS)})")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise TailorError(f"train.report_to: {name} needs the package '{TRACKERS[name]}' "
                              f"(pip install {TRACKERS[name]})")


def hyperparameters(train_config) -> dict[str, int | float | str | bool]:
    """The train.* settings as scalars: TensorBoard's hparams and MLflow's params refuse lists and None."""
    values = {}
    for key, value in train_config.model_dump(mode="json").items():
        if isinstance(value, (int, float, str, bool)):
            values[key] = value
        elif value is not None:
            values[key] = str(value)
    return values
