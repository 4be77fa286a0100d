"""The search space of `tune.space`: checking it against the config schema, sampling it, and turning a trial's
values into a config.

Values travel as dotted overrides (`methods.lora.r=8`) through `apply_overrides`, the same path as the command line,
so a searched option is validated exactly like a typed one.
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

from tailor.config import SearchDimension, TailorConfig, apply_overrides, validate_config
from tailor.errors import TailorError

# Optuna stores categorical choices as None, bool, int, float or str; others (lists of module names) travel as JSON
_PLAIN = (type(None), bool, int, float, str)


def as_override(key: str, value: Any) -> str:
    """`key=value` whose value YAML parses back to the same thing (1e-05 is a string to YAML; 1.0e-05 is not)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def encode_choice(value: Any) -> Any:
    return value if isinstance(value, _PLAIN) else json.dumps(value)


def decode_choice(dimension: SearchDimension, stored: Any) -> Any:
    for choice in dimension.choices or []:
        if encode_choice(choice) == stored:
            return choice
    return stored


def check_values(data: dict, space: dict[str, SearchDimension], source: str) -> None:
    """Every bound and choice must make a valid config, so a bad value stops before any model loads, not in
    trial 7."""
    for key, dimension in space.items():
        values = dimension.choices if dimension.type == "categorical" else [dimension.low, dimension.high]
        for value in values:
            if dimension.type == "int":
                value = int(value)
            try:
                validate_config(apply_overrides(data, [as_override(key, value)]), source)
            except TailorError as exc:
                raise TailorError(f"tune.space.{key}: the value {value!r} is not allowed ({exc})") from None


def grid_points(key: str, dimension: SearchDimension) -> list[Any]:
    """The values the grid sampler tries for one dimension."""
    if dimension.choices is not None:
        values = list(dimension.choices)
    elif dimension.type == "int":
        values = list(range(int(dimension.low), int(dimension.high) + 1, int(dimension.step or 1)))
    elif dimension.step is not None:
        count = math.floor((dimension.high - dimension.low) / dimension.step + 1e-9) + 1
        values = [round(dimension.low + i * dimension.step, 12) for i in range(count)]
    else:
        raise TailorError(f"tune.space.{key}: the grid sampler needs `choices` or `step` for a float range")
    if dimension.type == "int":
        values = [int(v) for v in values]
    return [encode_choice(v) for v in values]


def grid(space: dict[str, SearchDimension]) -> dict[str, list[Any]]:
    return {key: grid_points(key, dimension) for key, dimension in space.items()}


def sample(trial, space: dict[str, SearchDimension], grid_space: dict[str, list[Any]] | None = None) -> dict:
    """Ask the trial for a value of every dimension; returns {dotted key: value as the config takes it}."""
    values = {}
    for key, dimension in space.items():
        if grid_space is not None:  # the grid sampler hands out its points; a categorical keeps them exact
            stored = trial.suggest_categorical(key, grid_space[key])
            values[key] = decode_choice(dimension, stored) if dimension.type == "categorical" else stored
        elif dimension.type == "categorical":
            stored = trial.suggest_categorical(key, [encode_choice(c) for c in dimension.choices])
            values[key] = decode_choice(dimension, stored)
        elif dimension.type == "int":
            values[key] = trial.suggest_int(key, int(dimension.low), int(dimension.high),
                                            step=int(dimension.step or 1), log=dimension.log)
        else:
            values[key] = trial.suggest_float(key, dimension.low, dimension.high, step=dimension.step,
                                              log=dimension.log)
    return values


def params_to_values(params: dict, space: dict[str, SearchDimension]) -> dict:
    """A stored trial's parameters back into config values (choices decoded)."""
    return {key: decode_choice(space[key], stored) if space[key].type == "categorical" else stored
            for key, stored in params.items() if key in space}


def config_with(data: dict, values: dict, source: str) -> TailorConfig:
    return validate_config(apply_overrides(data, [as_override(k, v) for k, v in values.items()]), source)
