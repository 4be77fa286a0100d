"""The search space of `tune.space`: checking it against the config schema, sampling it, and turning a trial's
values into a config.

Values travel as dotted overrides (`methods.lora.r=8`) through `apply_overrides`, the same path as the command line,
so a searched option is validated exactly like a typed one.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import numpy as np
import optuna
import yaml

from tailor.config import SearchDimension, TailorConfig, apply_overrides, validate_config
from tailor.errors import TailorError

# Optuna stores categorical choices as None, bool, int, float or str; others (lists of module names) travel as JSON
_PLAIN = (type(None), bool, int, float, str)
# a finite space larger than this is sampled as it is: listing its points would cost more than a repeat
MAX_LISTED_POINTS = 100_000


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


def _range(dimension: SearchDimension) -> tuple[float, float]:
    """low and high of a float or int range (the config refuses a range without them: SearchDimension.problem)."""
    assert dimension.low is not None and dimension.high is not None
    return dimension.low, dimension.high


def _choices(dimension: SearchDimension) -> list[Any]:
    """A categorical dimension's choices (the config refuses one without: SearchDimension.problem)."""
    assert dimension.choices is not None
    return dimension.choices


def check_values(data: dict, space: dict[str, SearchDimension], source: str) -> None:
    """Every bound and choice must make a valid config, so a bad value stops before any model loads, not in
    trial 7."""
    for key, dimension in space.items():
        values = _choices(dimension) if dimension.type == "categorical" else list(_range(dimension))
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
        low, high = _range(dimension)
        values = list(range(int(low), int(high) + 1, int(dimension.step or 1)))
    elif dimension.step is not None:
        low, high = _range(dimension)
        count = math.floor((high - low) / dimension.step + 1e-9) + 1
        values = [round(low + i * dimension.step, 12) for i in range(count)]
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
            stored = trial.suggest_categorical(key, [encode_choice(c) for c in _choices(dimension)])
            values[key] = decode_choice(dimension, stored)
        elif dimension.type == "int":
            low, high = _range(dimension)
            values[key] = trial.suggest_int(key, int(low), int(high), step=int(dimension.step or 1),
                                            log=dimension.log)
        else:
            low, high = _range(dimension)
            values[key] = trial.suggest_float(key, low, high, step=dimension.step, log=dimension.log)
    return values


def params_to_values(params: dict, space: dict[str, SearchDimension]) -> dict:
    """A stored trial's parameters back into config values (choices decoded)."""
    return {key: decode_choice(space[key], stored) if space[key].type == "categorical" else stored
            for key, stored in params.items() if key in space}


def config_with(data: dict, values: dict, source: str) -> TailorConfig:
    return validate_config(apply_overrides(data, [as_override(k, v) for k, v in values.items()]), source)


def _finite(dimension: SearchDimension) -> tuple[optuna.distributions.BaseDistribution, list[Any]] | None:
    """The distribution `sample` suggests for a dimension and its values in order, when there are finitely many
    (categorical choices, int ranges); None for a float range, whose values do not repeat."""
    if dimension.type == "categorical":
        points = [encode_choice(c) for c in _choices(dimension)]
        return optuna.distributions.CategoricalDistribution(points), points
    if dimension.type == "int":
        low, high = (int(bound) for bound in _range(dimension))
        step = int(dimension.step or 1)
        return (optuna.distributions.IntDistribution(low, high, log=dimension.log, step=step),
                list(range(low, high + 1, step)))
    return None


class WrappedSampler(optuna.samplers.BaseSampler):
    """A sampler that changes how another one (`base`) chooses a whole point; everything else goes to `base`.
    Optuna has no wrapper of its own for this, so the delegation is written out once here."""

    base: optuna.samplers.BaseSampler

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self.base.reseed_rng()


class UntriedFirst(WrappedSampler):
    """A sampler that does not propose a point of a finite space again while another is untried.

    Training is seeded, so a point trained again gives the same result: in a small discrete space TPE proposes its
    best point over and over (the result reused, but no progress), and each copy adds a duplicate observation that
    narrows TPE and moves the median pruner's bar onto that point. A proposal of a tried or running point
    (running: another worker's) becomes the untried point nearest to it: fewest changed dimensions, counting an
    ordered dimension (int range) by how many values apart; a start-up trial becomes a random untried point. Once
    every point is tried, each pruned point gets a second chance (`second_chance`), then the base sampler's
    proposals stand. Float ranges are not finite: such spaces are not wrapped (see `untried_first`).
    """

    def __init__(self, base: optuna.samplers.BaseSampler, space: dict[str, SearchDimension], seed: int | None):
        self.base, self.rng = base, np.random.RandomState(seed)
        finite: dict[str, tuple[optuna.distributions.BaseDistribution, list[Any]]] = {}
        for key, dimension in space.items():
            listed = _finite(dimension)
            assert listed is not None  # untried_first wraps only spaces of finitely many points
            finite[key] = listed
        self.keys = list(space)
        self.distributions = {key: distribution for key, (distribution, _) in finite.items()}
        self.points = {key: points for key, (_, points) in finite.items()}
        # an int range is ordered: its distance counts steps; categorical choices are only equal or not
        self.steps = {key: int(space[key].step or 1) for key in self.keys if space[key].type == "int"}

    def _distance(self, a: tuple, b: tuple) -> int:
        return sum(abs(x - y) // self.steps[key] if key in self.steps else int(x != y)
                   for key, x, y in zip(self.keys, a, b, strict=True))

    def infer_relative_search_space(self, study, trial):
        return dict(self.distributions)  # the whole point is chosen at once, in sample_relative

    def sample_relative(self, study, trial, search_space):
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                  optuna.trial.TrialState.RUNNING)
        tried = {tuple(t.params.get(key) for key in self.keys)
                 for t in study.get_trials(deepcopy=False, states=states) if t.number != trial.number}
        base_space = self.base.infer_relative_search_space(study, trial)
        proposal = self.base.sample_relative(study, trial, base_space) if base_space else {}
        proposed = tuple(proposal.get(key) for key in self.keys) if set(proposal) >= set(self.keys) else None
        if proposed is not None and proposed not in tried:
            return proposal
        untried = [point for point in itertools.product(*self.points.values()) if point not in tried]
        if not untried:  # every point tried: a pruned one gets its second chance, else a repeat is reused free
            chance = second_chance(study, self.keys, trial.number)
            return dict(zip(self.keys, chance, strict=True)) if chance is not None else proposal
        if proposed is not None:
            nearest = min(self._distance(proposed, point) for point in untried)
            untried = [point for point in untried if self._distance(proposed, point) == nearest]
        return dict(zip(self.keys, untried[self.rng.randint(len(untried))], strict=True))

    def reseed_rng(self):
        super().reseed_rng()
        self.rng.seed()


def second_chance(study, keys: list[str], exclude: int) -> tuple | None:
    """Once every point of a finite space is tried: the pruned point that looked best at the first report, to be
    trained to the end without pruning; None when every pruned point has had its chance (or is having it).

    A pruner at the first report keeps what starts fast, and the learning rate that ends best can start slowly: on
    Privoxy's grid (benchmarks/tune.py) successive halving stopped both points within 1% of the best in 19% of the
    searches, which then never got there, while their later trials only repeated finished points for nothing.
    `exclude`: the asking trial's number (it is running)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.number != exclude]

    def point(t) -> tuple:
        return tuple(t.params.get(key) for key in keys)

    settled = {point(t) for t in trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.RUNNING)}
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values
              and point(t) not in settled]
    if not pruned:
        return None
    first = min(min(t.intermediate_values) for t in pruned)
    # intermediate values are in the study's direction (tailor negates an eval loss a maximizing study reports)
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    best = min(pruned, key=lambda t: (first not in t.intermediate_values,
                                      sign * t.intermediate_values.get(first, 0.0), t.number))
    return point(best)


def untried_first(base: optuna.samplers.BaseSampler, space: dict[str, SearchDimension],
                  seed: int | None) -> optuna.samplers.BaseSampler:
    """`base` wrapped in UntriedFirst when the space has finitely many points (at most MAX_LISTED_POINTS)."""
    finite = [_finite(dimension) for dimension in space.values()]
    listed = [f for f in finite if f is not None]
    if not finite or len(listed) < len(finite) or math.prod([len(points) for _, points in listed]) > MAX_LISTED_POINTS:
        return base
    return UntriedFirst(base, space, seed)
