"""Replays tailor's search offline, on the recorded grid of benchmarks/tune.py: which search is better?

    python benchmarks/tune_replay.py [--seeds 200] [--strategy NAME …] [--json OUT]   → a table of strategies

Training is deterministic: a trial at a grid point reports exactly the grid's eval losses (steps 2, 4, …, 12) and
ends with the grid's final value. This script runs a search in memory, with each trial's training replaced by those
recorded numbers (`grid.values`, `grid.intermediate` of benchmarks/results/tune.json), so a strategy is measured over
hundreds of seeds in seconds. Two figures:

* `budget_replay` (what benchmarks/tune.py reports, for SEARCH_STRATEGIES): a search's regret once it has spent a
  third of the grid's steps, and its steps until its best is within 1% of the grid's best;
* the table this command prints (the retired goal's figure, kept for the studies below): the training steps (a
  pruned trial counts the steps it ran, a repeated point 0) until the best value, rounded to 4 decimals, is the
  grid's best, divided by the grid's steps.

What is simulated is what tailor runs: the config is the benchmark's (`benchmarks/tune.py` settings on the city
example's tailor.yaml, validated by tailor), the study gets tailor's sampler and pruner (`configure_study`, reseeded
before every trial from `tune.seed` and the trial count, as a study resumed one trial per call is; the studies other
than SEARCH_STRATEGIES were recorded when that seed was `tune.seed + len(study.trials)` and a pruned point had no second
chance (`AS_RECORDED`), and replay that way: the retired benchmark ran it so; over many seeds it is the same search as
one `tailor tune` call with other random draws), trials are sampled by `tailor.tune.space.sample`, repeats are reused by
`reuse_same_point` and the pruner is asked by tailor's `PruningReporter`. A strategy that is not tailor's code (the
candidates compared) replaces one of those functions, and says which. `tailor` replays the benchmark as it is declared
now. `before` is tailor before `UntriedFirst` (a plain TPESampler); it replays the real runs of that code trial by
trial: seeds 0, 1, 2 measured 0.3333, 0.3111, 0.3444 (`--check-seed 0 --strategy before --expect 0.3333` checks it).

No model is loaded: this runs in seconds.

Rows named `bound-…` are not strategies but bounds: their pruner knows every point's final value
(`_ClairvoyantPruner`), to measure how much any pruner could save with tailor's sampler.

Held-out landscapes (`--landscapes N`): a strategy chosen on this one grid is tuned to it. `--landscapes N` also
replays every strategy on N synthetic grids of the same shape (5 learning rates 1e-4 … 1e-2, a half-decade apart, ×
ranks 4, 8, 16; 12 steps, an eval loss every 2), `--landscape-seeds S` seeds each (0 … S-1), and reports the same
figures over the N × S searches. Landscape k is drawn from `numpy.random.RandomState(SYNTHETIC_SEED + k)`
(`synthetic_grid`), so its numbers never change. The family, per landscape:

* the eval loss starts at L0 ~ U(1.8, 2.6); full training gains drop ~ U(0.3, 0.8) of it (the floor);
* progress is proportional to the learning rate: at lr index i (0 … 4) the loss after t steps is
  floor + (L0 - floor) · exp(-rate · 3^(i - c) · t), with rate ~ U(0.25, 0.6) per step at the critical index
  c ~ U(1.5, 4.5), where training turns unstable; c is where the best lr lies (anywhere from index 1 to the top);
* a high but stable lr ends a little above the floor (+ excess · 9^(i - c), excess ~ U(0, 0.06)), so the lr just
  under c does not always win;
* over c (x = i - c > 0) training diverges: + x · (spike · b(t) + plateau), spike ~ U(0.3, 1.5), plateau ~ U(0.1,
  0.6), b(t) = (t/τ) · exp(1 - t/τ) a bump that peaks at step τ ~ U(2, 6) (late: a diverging lr can look best at
  the first eval, as fast learning rates do), with 10 × x more noise;
* rank: in half the landscapes negligible (the drop × (1 + N(0, 0.002)), c moved by N(0, 0.03) per rank), as in
  the city grid, in the other half a small real effect (the drop × (1 + N(0, s)), s ~ U(0.01, 0.04), c moved by
  N(0, 0.15) per rank);
* every eval loss gets N(0, σ) noise, σ ~ U(0.001, 0.006); the final value is the step-12 loss + N(0, σ / 3).

This resembles the city grid (one fast, stable lr best, the top lr diverging, ranks within noise) without copying
it; the best lr, the speed, the instability and the weight of rank vary.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import tune as benchmark  # noqa: E402  (benchmarks/tune.py: its settings are what is replayed)

import tailor.tune.search as search  # noqa: E402
import tailor.tune.space as space_module  # noqa: E402
from tailor.config import apply_overrides, load_raw, validate_config  # noqa: E402
from tailor.tune.space import UntriedFirst, WrappedSampler, untried_first  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tune.json"
GOAL = 0.33  # the retired goal: the grid's exact best within this share of its steps
BUDGET_SHARE = 1 / 3  # the goal at a budget: the best within WITHIN of the grid's best after a third of its steps
WITHIN = 0.01
SEARCH_STRATEGIES = ("tailor", "random", "random_pruned", "median")  # the strategies benchmarks/tune.py compares
SYNTHETIC_SEED = 10_000  # landscape k: RandomState(SYNTHETIC_SEED + k)

LEARNING_RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
RANKS = [4, 8, 16]
CATEGORICAL = {"train.learning_rate": {"type": "categorical", "choices": LEARNING_RATES},
               "methods.lora.r": {"type": "categorical", "choices": RANKS}}
ORDERED = {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True,
                                   "choices": LEARNING_RATES},
           "methods.lora.r": {"type": "int", "low": 4, "high": 16, "choices": RANKS}}
ORDERED_LOG_R = {**ORDERED, "methods.lora.r": {"type": "int", "low": 4, "high": 16, "log": True, "choices": RANKS}}


@dataclass
class Strategy:
    name: str
    summary: str
    space: dict | None = None  # None: the space benchmarks/tune.py declares
    overrides: list[str] = field(default_factory=list)
    # replacements of tailor's own functions, by "module.attribute" (tailor.tune.search._sampler, …)
    patches: dict[str, Callable] = field(default_factory=dict)
    # the pruner the strategy varies on: the studies of the retired goal were defined on the median pruner (tailor's
    # default then, warm-up a third of a trial); None: tailor's default now
    pruner: str | None = "median"


# ---- candidate code paths that are not (or not yet) tailor's own ----

def _tpe(**options) -> Callable:
    """tailor's `_sampler` before UntriedFirst (a plain TPESampler), with TPE options of its own."""
    def make(config, seed):
        assert config.tune.sampler == "bayesian"
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.tune.startup_trials, **options)
    return make


def _index_sample(trial, space, grid_space=None):
    """A numeric dimension with choices searched as the index of its sorted choices (suggest_int): TPE sees the
    order of the points, evenly spaced; the stored parameter is the index."""
    if grid_space is not None:
        return original_sample(trial, space, grid_space)
    values = {}
    for key, dimension in space.items():
        if dimension.type != "categorical" and dimension.choices is not None:
            points = sorted(dimension.choices)
            values[key] = points[trial.suggest_int(key, 0, len(points) - 1)]
        else:
            values.update(original_sample(trial, {key: dimension}))
    return values


original_sample = space_module.sample


class _Snapping(WrappedSampler):
    """Candidate: the sampler proposes in the declared range (log scale when declared) and the value is moved to
    the nearest choice before it is stored, so the study holds the values trained."""

    def __init__(self, base, space):
        self.base = base
        self.points = {key: (sorted(d.choices), d.log) for key, d in space.items()
                       if d.type != "categorical" and d.choices is not None}

    def snap(self, name, value):
        if name not in self.points:
            return value
        points, log = self.points[name]
        where = (lambda v: math.log(v)) if log else (lambda v: v)
        return min(points, key=lambda point: abs(where(point) - where(value)))

    def infer_relative_search_space(self, study, trial):
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return {k: self.snap(k, v) for k, v in self.base.sample_relative(study, trial, search_space).items()}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.snap(param_name, self.base.sample_independent(study, trial, param_name, param_distribution))



def _snapping_sampler(config, seed):
    return _Snapping(_tpe()(config, seed), config.tune.space)


class _Untried(WrappedSampler):
    """Candidate: in a space of finitely many points, a proposal of a point already tried (or running) is
    replaced by the untried point nearest to it (in the order of each dimension's points; categorical: equal or
    not), a start-up trial by a random untried point. Training is deterministic, so a repeat is pure waste."""

    def __init__(self, base, space, seed, ordered: bool, index: bool):
        import itertools

        import numpy as np

        self.base, self.rng = base, np.random.RandomState(seed)
        self.keys = list(space)
        self.points, self.distributions, self.orders = {}, {}, {}
        for key, d in space.items():
            if d.type == "categorical":
                points = [space_module.encode_choice(c) for c in d.choices]
                self.distributions[key] = optuna.distributions.CategoricalDistribution(points)
                self.orders[key] = False
            elif index:
                points = list(range(len(d.choices)))
                self.distributions[key] = optuna.distributions.IntDistribution(0, len(points) - 1)
                self.orders[key] = True
            else:
                points = sorted(d.choices)
                self.distributions[key] = optuna.distributions.CategoricalDistribution(points)
                self.orders[key] = ordered
            self.points[key] = points
        if not ordered:
            self.orders = dict.fromkeys(self.keys, False)
        self.grid = list(itertools.product(*(self.points[k] for k in self.keys)))

    def distance(self, a, b):
        total = 0
        for key, x, y in zip(self.keys, a, b, strict=True):
            if self.orders[key]:
                total += abs(self.points[key].index(x) - self.points[key].index(y))
            else:
                total += x != y
        return total

    def infer_relative_search_space(self, study, trial):
        return dict(self.distributions)

    def sample_relative(self, study, trial, search_space):
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
        tried = {tuple(t.params.get(k) for k in self.keys) for t in study.get_trials(deepcopy=False, states=states)
                 if t.number != trial.number}
        untried = [p for p in self.grid if p not in tried]
        base_space = self.base.infer_relative_search_space(study, trial)
        proposal = self.base.sample_relative(study, trial, base_space) if base_space else {}
        point = tuple(proposal.get(k) for k in self.keys)
        if len(proposal) == len(self.keys) and (point not in tried or not untried):
            return proposal
        if not untried:
            return {}
        if len(proposal) == len(self.keys):
            nearest = min(self.distance(point, p) for p in untried)
            untried = [p for p in untried if self.distance(point, p) == nearest]
        return dict(zip(self.keys, untried[self.rng.randint(len(untried))], strict=True))



def _untried_sampler(ordered: bool, index: bool = False, **tpe_options):
    def make(config, seed):
        return _Untried(_tpe(**tpe_options)(config, seed), config.tune.space, seed, ordered, index)
    return make


def _points_sample(trial, space, grid_space=None):
    """Numeric choices suggested as categorical points, like the grid sampler's."""
    if grid_space is not None:
        return original_sample(trial, space, grid_space)
    values = {}
    for key, dimension in space.items():
        if dimension.type != "categorical" and dimension.choices is not None:
            values[key] = trial.suggest_categorical(key, sorted(dimension.choices))
        else:
            values.update(original_sample(trial, {key: dimension}))
    return values


def _reuse_unreported(study, trial):
    """Candidate: a repeated point returns its result but reports no eval losses, so the pruners' medians and
    rungs count each trained point once."""
    repeated = search._same_point(study, trial)
    if repeated is None:
        return None
    trial.set_user_attr("steps", 0)
    trial.set_user_attr("repeats", repeated.number)
    if repeated.state == optuna.trial.TrialState.PRUNED:
        raise optuna.TrialPruned()
    return float(repeated.value)


def _reuse_as_no_observation(study, trial):
    """Candidate: a repeated point is not an observation at all (state FAIL through a NaN value): neither TPE nor
    the pruners see the same result twice."""
    repeated = search._same_point(study, trial)
    if repeated is None:
        return None
    trial.set_user_attr("steps", 0)
    trial.set_user_attr("repeats", repeated.number)
    return float("nan")


def _tailor_tpe(**options) -> Callable:
    """tailor's `_sampler` (TPE in UntriedFirst) with TPE options of its own."""
    def make(config, seed):
        assert config.tune.sampler == "bayesian"
        tpe = optuna.samplers.TPESampler(**{"seed": seed, "n_startup_trials": config.tune.startup_trials, **options})
        return untried_first(tpe, config.tune.space, seed)
    return make


class _ClairvoyantPruner(optuna.pruners.BasePruner):
    """Not a strategy but a bound: it knows every point's final value (the grid being replayed). At its first report
    at or after step `at` it stops a trial exactly when the trial will not beat the best finished trial so far (the
    question a pruner tries to answer from eval losses), or, with `only_best`, every trial but the grid's best (what
    the sampler's order alone costs)."""

    def __init__(self, at: int, only_best: bool = False):
        self.at, self.only_best = at, only_best

    def prune(self, study, trial) -> bool:
        if trial.last_step is None or trial.last_step < self.at:
            return False
        final = _replayed[0].values[json.dumps(trial.params, sort_keys=True)]
        if self.only_best:
            return round(final, 4) > round(_replayed[0].best, 4)
        done = [t.value for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
        return bool(done) and final >= min(done)  # a tie does not beat it


_replayed: list[Grid] = []  # the grid `replay` runs on, for _ClairvoyantPruner


def _tailor_gp(n_startup_trials: int) -> Callable:
    """Gaussian-process Bayesian optimization (Optuna's GPSampler) in tailor's UntriedFirst, instead of TPE."""
    def make(config, seed):
        gp = optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup_trials)
        return untried_first(gp, config.tune.space, seed)
    return make


class _SpreadStart(UntriedFirst):
    """UntriedFirst whose start-up trials spread over the choices: the untried point whose values were tried the
    fewest times (a Latin-hypercube-like start), instead of a random untried one; then TPE as tailor runs it."""

    def __init__(self, base, space, seed, n_startup_trials: int):
        super().__init__(base, space, seed)
        self.n_startup_trials = n_startup_trials

    def sample_relative(self, study, trial, search_space):
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        if len(study.get_trials(deepcopy=False, states=finished)) >= self.n_startup_trials:  # TPE's own test
            return super().sample_relative(study, trial, search_space)  # TPE models: tailor's behaviour
        states = (*finished, optuna.trial.TrialState.RUNNING)
        tried = [tuple(t.params.get(key) for key in self.keys)
                 for t in study.get_trials(deepcopy=False, states=states) if t.number != trial.number]
        untried = [point for point in itertools.product(*self.points.values()) if point not in tried]
        if not untried:
            return {}
        uses = [collections.Counter(point[i] for point in tried) for i in range(len(self.keys))]
        least = min(sum(uses[i][value] for i, value in enumerate(point)) for point in untried)
        untried = [point for point in untried if sum(uses[i][value] for i, value in enumerate(point)) == least]
        return dict(zip(self.keys, untried[self.rng.randint(len(untried))], strict=True))


def _spread_start(n_startup_trials: int) -> Callable:
    def make(config, seed):
        return _SpreadStart(optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials),
                            config.tune.space, seed, n_startup_trials)
    return make


def _pruner(kind: str, **options) -> Callable:
    def make(config, every, warmup=0):
        if kind == "patient":  # tailor's median pruner, acting only after `patience` reports without progress
            return optuna.pruners.PatientPruner(_pruner("median")(config, every, warmup), **options)
        if kind == "wilcoxon":  # the eval losses of a trial against the best trial's at the same steps
            return optuna.pruners.WilcoxonPruner(**options)
        if kind == "median":
            return optuna.pruners.MedianPruner(**{"n_startup_trials": min(3, config.tune.startup_trials),
                                                  "n_warmup_steps": warmup, **options})
        if kind == "percentile":
            return optuna.pruners.PercentilePruner(**{"n_startup_trials": min(3, config.tune.startup_trials),
                                                      "n_warmup_steps": warmup, **options})
        if kind == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**{"min_resource": max(every, warmup),
                                                             "reduction_factor": 3, **options})
        if kind == "hyperband":
            return optuna.pruners.HyperbandPruner(**{"min_resource": max(every, warmup), "max_resource": "auto",
                                                     "reduction_factor": 3, **options})
        return optuna.pruners.NopPruner()
    return make


def strategies() -> list[Strategy]:
    plain = {"tailor.tune.search._sampler": _tpe()}  # TPE as tailor ran it before UntriedFirst
    index = {"tailor.tune.search.sample": _index_sample}
    listed = [
        Strategy("tailor", "the benchmark as declared now, tailor's code and defaults only (TPE in UntriedFirst, "
                 "successive halving from the first report)", pruner=None),
        # the baselines of the goal at a budget: tailor's code with tune.sampler=random (Optuna's RandomSampler in
        # UntriedFirst: without pruning that changes no step count, since a repeated point is reused at 0 steps)
        Strategy("random", "Optuna's RandomSampler (tune.sampler=random), no pruning",
                 overrides=["tune.sampler=random", "tune.pruner=none"], pruner=None),
        Strategy("random_pruned", "Optuna's RandomSampler (tune.sampler=random) with tailor's default pruner",
                 overrides=["tune.sampler=random"], pruner=None),
        Strategy("median", "tailor before successive halving became its default: the median pruner after a third "
                 "of a trial (the base of the rows below)"),
        Strategy("before", "the grid points as categorical choices, plain TPE (tailor before)", CATEGORICAL,
                 patches=plain),
        Strategy("before-index", "before, numeric choices searched as the index of the sorted points "
                 "(suggest_int, ordered)", ORDERED, patches={**plain, **index}),
        Strategy("before-snap", "before, the range sampled (log lr, linear r), snapped to the nearest choice",
                 ORDERED, patches={"tailor.tune.search._sampler": _snapping_sampler}),
        Strategy("before-snap-log-r", "before-snap with r on a log scale too", ORDERED_LOG_R,
                 patches={"tailor.tune.search._sampler": _snapping_sampler}),
        Strategy("before-independent", "before, TPE multivariate=False", CATEGORICAL,
                 patches={"tailor.tune.search._sampler": _tpe(multivariate=False)}),
        Strategy("before-group", "before, TPE group=True", CATEGORICAL,
                 patches={"tailor.tune.search._sampler": _tpe(group=True)}),
        Strategy("before-ei96", "before, TPE n_ei_candidates=96", CATEGORICAL,
                 patches={"tailor.tune.search._sampler": _tpe(n_ei_candidates=96)}),
        Strategy("before-unreported", "before, a repeated point reports no eval losses to the pruner",
                 CATEGORICAL, patches={**plain, "tailor.tune.search.reuse_same_point": _reuse_unreported}),
        Strategy("before-no-observation", "before, a repeated point is no observation (FAIL)", CATEGORICAL,
                 patches={**plain, "tailor.tune.search.reuse_same_point": _reuse_as_no_observation}),
        Strategy("untried-points", "UntriedFirst; numeric choices as points, nearest untried in their order",
                 ORDERED, patches={"tailor.tune.search._sampler": _untried_sampler(True),
                                   "tailor.tune.search.sample": _points_sample}),
        Strategy("untried-index", "UntriedFirst over the index of the sorted choices (suggest_int)", ORDERED,
                 patches={**index, "tailor.tune.search._sampler": _untried_sampler(True, index=True)}),
        Strategy("untried-independent", "tailor, TPE multivariate=False", CATEGORICAL,
                 patches={"tailor.tune.search._sampler": _untried_sampler(False, multivariate=False)}),
    ]
    variants = (  # (suffix, summary, overrides, pruner replacement)
        ("startup1", "1 start-up trial", ["tune.startup_trials=1"], None),
        ("startup3", "3 start-up trials", ["tune.startup_trials=3"], None),
        ("warmup2", "median warm-up 2 steps", ["tune.pruner_warmup_steps=2"], None),
        ("warmup6", "median warm-up 6 steps", ["tune.pruner_warmup_steps=6"], None),
        ("median-after1", "median pruner after 1 trial", [], _pruner("median", n_startup_trials=1)),
        ("median-after3", "median pruner after 3 trials", [], _pruner("median", n_startup_trials=3)),
        ("percentile66", "percentile pruner 66 (the worst third stops)", [], _pruner("percentile", percentile=66.0)),
        ("halving", "successive halving", ["tune.pruner=successive_halving"], None),
        ("hyperband", "Hyperband", ["tune.pruner=hyperband"], None),
        ("nopruner", "no pruning", ["tune.pruner=none"], None))
    for prefix, base in (("before", plain), ("tailor", {})):
        for suffix, summary, overrides, pruner in variants:
            patches = {**base, **({"tailor.tune.search._pruner": pruner} if pruner else {})}
            listed.append(Strategy(f"{prefix}-{suffix}", f"{prefix}, {summary}", CATEGORICAL, overrides, patches))
    # the options Optuna offers, one at a time on tailor's search (compared on the synthetic landscapes)
    samplers = (
        ("tpe-startup1", "TPE after 1 random trial (the pruner's start-up unchanged)", {"n_startup_trials": 1}),
        ("tpe-startup3", "TPE after 3 random trials (the pruner's start-up unchanged)", {"n_startup_trials": 3}),
        ("tpe-startup5", "TPE after 5 random trials (the pruner's start-up unchanged)", {"n_startup_trials": 5}),
        ("tpe-independent", "TPE multivariate=False", {"multivariate": False}),
        ("tpe-group", "TPE group=True", {"group": True}),
        ("tpe-no-liar", "TPE constant_liar=False", {"constant_liar": False}),
        ("tpe-prior0.5", "TPE prior_weight=0.5", {"prior_weight": 0.5}),
        ("tpe-prior2", "TPE prior_weight=2", {"prior_weight": 2.0}),
        ("tpe-endpoints", "TPE consider_endpoints=True", {"consider_endpoints": True}))
    for suffix, summary, options in samplers:
        listed.append(Strategy(f"tailor-{suffix}", f"tailor, {summary}", CATEGORICAL,
                               patches={"tailor.tune.search._sampler": _tailor_tpe(**options)}))
    pruners = (
        ("percentile33", "percentile pruner 33 (only the best third goes on)", _pruner("percentile", percentile=33.0)),
        ("percentile75", "percentile pruner 75 (the worst quarter stops)", _pruner("percentile", percentile=75.0)),
        ("halving-min2", "successive halving, first rung at step 2", _pruner("successive_halving", min_resource=2)),
        ("halving-min6", "successive halving, first rung at step 6", _pruner("successive_halving", min_resource=6)),
        ("halving-rf2", "successive halving, reduction factor 2", _pruner("successive_halving", reduction_factor=2)),
        ("halving-rf4", "successive halving, reduction factor 4", _pruner("successive_halving", reduction_factor=4)),
        ("hyperband-min2", "Hyperband, min_resource 2", _pruner("hyperband", min_resource=2)),
        ("hyperband-min6", "Hyperband, min_resource 6", _pruner("hyperband", min_resource=6)),
        ("hyperband-rf2", "Hyperband, reduction factor 2", _pruner("hyperband", reduction_factor=2)),
        ("hyperband-rf4", "Hyperband, reduction factor 4", _pruner("hyperband", reduction_factor=4)),
        ("patient1", "median pruner in PatientPruner(patience=1)", _pruner("patient", patience=1)),
        ("patient2", "median pruner in PatientPruner(patience=2)", _pruner("patient", patience=2)),
        ("wilcoxon0.1", "WilcoxonPruner(p_threshold=0.1)", _pruner("wilcoxon", p_threshold=0.1)),
        ("wilcoxon0.3", "WilcoxonPruner(p_threshold=0.3)", _pruner("wilcoxon", p_threshold=0.3)))
    for suffix, summary, pruner in pruners:
        listed.append(Strategy(f"tailor-{suffix}", f"tailor, {summary}", CATEGORICAL,
                               patches={"tailor.tune.search._pruner": pruner}))
    # combinations, and other samplers (GP, a spread-out start), each with the median and a percentile pruner
    combined_pruners = (("median", None), ("p66", _pruner("percentile", percentile=66.0)),
                        ("p75", _pruner("percentile", percentile=75.0)))
    for startup in (3, 4, 5, 10):
        for pruner_name, pruner in combined_pruners:
            for warmup in (None, 6):
                patches = {"tailor.tune.search._sampler": _tailor_tpe(n_startup_trials=startup),
                           **({"tailor.tune.search._pruner": pruner} if pruner else {})}
                listed.append(Strategy(
                    f"tailor-tpe{startup}-{pruner_name}-wu{warmup or 4}",
                    f"tailor, TPE after {startup} random trials, {pruner_name} pruner, warm-up {warmup or 4} steps",
                    CATEGORICAL, [f"tune.pruner_warmup_steps={warmup}"] if warmup else [], patches))
    for startup in (2, 3, 5):
        for pruner_name, pruner in combined_pruners[::2]:
            extra = {"tailor.tune.search._pruner": pruner} if pruner else {}
            listed.append(Strategy(f"tailor-gp{startup}-{pruner_name}",
                                   f"GPSampler after {startup} random trials in UntriedFirst, {pruner_name} pruner",
                                   CATEGORICAL, patches={"tailor.tune.search._sampler": _tailor_gp(startup), **extra}))
            listed.append(Strategy(f"tailor-spread{startup}-{pruner_name}",
                                   f"TPE after {startup} spread-out start-up trials, {pruner_name} pruner",
                                   CATEGORICAL, patches={"tailor.tune.search._sampler": _spread_start(startup),
                                                         **extra}))
    for at in (2, 4):  # bounds: what pruning alone could gain with tailor's sampler
        listed.append(Strategy(f"bound-clairvoyant-pruner-step{at}",
                               f"tailor's sampler; a pruner that knows every final value stops at step {at} every "
                               "trial that will not beat the best so far (a bound, not a strategy)", CATEGORICAL,
                               patches={"tailor.tune.search._pruner":
                                        lambda config, every, warmup=0, at=at: _ClairvoyantPruner(at)}))
    listed.append(Strategy("bound-clairvoyant-pruner-step2-random",
                           "Optuna's RandomSampler (tune.sampler=random); the clairvoyant pruner at step 2 (a bound, "
                           "not a strategy)", CATEGORICAL, ["tune.sampler=random"],
                           patches={"tailor.tune.search._pruner":
                                    lambda config, every, warmup=0: _ClairvoyantPruner(2)}))
    listed.append(Strategy("bound-clairvoyant-only-best-step4",
                           "tailor's sampler; every trial but the grid's best stopped at step 4 (what the sampler's "
                           "order alone costs; a bound, not a strategy)", CATEGORICAL,
                           patches={"tailor.tune.search._pruner":
                                    lambda config, every, warmup=0: _ClairvoyantPruner(4, only_best=True)}))
    for strategy in listed:  # the recorded studies replay as tailor ran them then
        if strategy.name not in SEARCH_STRATEGIES:
            strategy.patches = {**AS_RECORDED, **strategy.patches}
    return listed


def _additive_seed(seed: int, trials: int, worker: int) -> int:
    """tailor's sampler seed before issue 22's searches showed that it made neighbouring seeds repeat each other's
    trials (seed 0 resumed after one trial proposed what seed 1 did): every study but SEARCH_STRATEGIES' was
    recorded with it (tune_replay.json, tune_replay_budget.json) and replays with it."""
    return seed + trials + 7919 * worker


def _no_second_chance(study, keys, exclude):
    """tailor before a pruned point got a second chance once every point was tried (a repeat of it was pruned
    again): the recorded studies of the strategies other than SEARCH_STRATEGIES ran so."""
    return None


# tailor's code as every study but SEARCH_STRATEGIES' was recorded (tune_replay*.json): the additive seed, and no
# second chance for pruned points
AS_RECORDED = {"tailor.tune.search.sampler_seed": _additive_seed, "tailor.tune.search.second_chance": _no_second_chance,
               "tailor.tune.space.second_chance": _no_second_chance}


def as_now(strategy: Strategy) -> Strategy:
    """`strategy` on tailor's code as it is now, without AS_RECORDED: a bound compared with today's searches."""
    return replace(strategy, patches={target: patch for target, patch in strategy.patches.items()
                                      if target not in AS_RECORDED})


# ---- the replay ----

@dataclass
class Grid:
    values: dict[str, float]  # json.dumps(params, sort_keys=True) → final eval loss
    intermediate: dict[str, dict[int, float]]  # … → {step: eval loss}
    steps: int
    best: float

    @classmethod
    def load(cls, path: Path) -> Grid:
        return cls.from_record(json.loads(path.read_text(encoding="utf-8"))["grid"])

    @classmethod
    def from_record(cls, grid: dict) -> Grid:
        """A grid as benchmarks/tune.py's record_grid wrote it."""
        intermediate = {key: {int(step): value for step, value in losses.items()}
                        for key, losses in grid["intermediate"].items()}
        return cls(values=grid["values"], intermediate=intermediate, steps=grid["steps"],
                   best=min(grid["values"].values()))


def synthetic_grid(landscape: int) -> Grid:
    """Landscape `landscape` of the synthetic family the module's docstring describes, as a recorded grid."""
    rng = np.random.RandomState(SYNTHETIC_SEED + landscape)
    start, drop = rng.uniform(1.8, 2.6), rng.uniform(0.3, 0.8)
    critical, rate = rng.uniform(1.5, 4.5), rng.uniform(0.25, 0.6)
    excess, spike, plateau, peak = rng.uniform(0, 0.06), rng.uniform(0.3, 1.5), rng.uniform(0.1, 0.6), \
        rng.uniform(2, 6)
    rank_matters = rng.rand() < 0.5
    rank_gain = rng.normal(0, rng.uniform(0.01, 0.04) if rank_matters else 0.002, len(RANKS))
    rank_shift = rng.normal(0, 0.15 if rank_matters else 0.03, len(RANKS))
    noise = rng.uniform(0.001, 0.006)
    values, intermediate = {}, {}
    for j, rank in enumerate(RANKS):
        floor = start - drop * (1 + rank_gain[j])
        for i, learning_rate in enumerate(LEARNING_RATES):
            over = i - (critical + rank_shift[j])  # lr indices over the critical one; < 0: stable
            losses = {}
            for step in range(2, 13, 2):
                loss = floor + (start - floor) * math.exp(-rate * 3.0 ** over * step) + excess * 9.0 ** min(over, 0)
                if over > 0:
                    loss += over * (spike * (step / peak) * math.exp(1 - step / peak) + plateau)
                losses[step] = float(loss + rng.normal(0, noise * (1 + 10 * max(over, 0))))
            key = json.dumps({"methods.lora.r": rank, "train.learning_rate": learning_rate}, sort_keys=True)
            intermediate[key] = losses
            values[key] = float(losses[12] + rng.normal(0, noise / 3))
    return Grid(values=values, intermediate=intermediate, steps=12 * len(values), best=min(values.values()))


class ReplayedReporter(search.PruningReporter):
    """tailor's reporter, reading the grid's recorded eval loss instead of a training run's metrics.jsonl."""

    def __init__(self, trial, losses: dict[int, float], every: int, last_step: int):
        super().__init__(trial, Path("unused"), every, maximize=False, last_step=last_step)
        self.losses = losses

    def _eval_loss(self, step: int) -> float | None:
        return self.losses.get(step)


_configs: dict[str, object] = {}


def benchmark_config(strategy: Strategy, seed: int):
    if strategy.name not in _configs:  # validating takes seconds (the base model is resolved): once per strategy
        overrides, declared = benchmark.settings(strategy.pruner)
        # the strategy's overrides last: `random` replaces the sampler
        data = apply_overrides(load_raw(benchmark.EXAMPLE / "tailor.yaml"),
                               overrides + ["tune.sampler=bayesian"] + strategy.overrides)
        data.setdefault("tune", {})["space"] = strategy.space or declared
        _configs[strategy.name] = validate_config(data, f"replay ({strategy.name})")
    config = _configs[strategy.name]
    return config.model_copy(update={"tune": config.tune.model_copy(update={"seed": seed})})


def reached_grid_best(grid: Grid) -> Callable[[int, float], bool]:
    """The old goal's stop: the best value, rounded like the reports (4 decimals), is the grid's best."""
    return lambda spent, best: round(best, 4) <= round(grid.best, 4)


def replay(strategy: Strategy, seed: int, grid: Grid, stop: Callable[[int, float], bool] | None = None) -> dict:
    """One search as benchmarks/tune.py ran it: one trial per call on a resumed study, until `stop(steps spent,
    best value so far)` (default: `reached_grid_best`), the grid's steps are spent or the trial cap is hit.

    `fraction` is the steps until the grid's best over the grid's steps (None: not reached); `trace` is
    [(steps spent, best finished value so far)] after every trial, for the figures at a budget."""
    stop = stop or reached_grid_best(grid)
    _replayed[:] = [grid]
    config = benchmark_config(strategy, seed)
    last_step = int(config.train.max_steps)  # train.max_steps decides the length, not the record count
    every = search.report_interval(config, n_train=0)
    warmup = search.pruner_warmup(config, n_train=0, every=every)
    study = optuna.create_study(direction="minimize")  # in memory: a replay leaves nothing behind
    spent, history = 0, []
    grid_size = len(grid.values)

    def objective(trial) -> float:
        values = search.sample(trial, config.tune.space)
        reused = search.reuse_same_point(study, trial)
        if reused is not None:
            return reused
        key = json.dumps(values, sort_keys=True)
        reporter = ReplayedReporter(trial, grid.intermediate[key], every, last_step)
        step = 0
        for step in range(1, last_step + 1):  # the training core asks should_stop after every step
            if reporter(step):
                break
        trial.set_user_attr("steps", step)
        if reporter.pruned:
            raise optuna.TrialPruned()
        return grid.values[key]

    reached, trace = None, []
    for _ in range(4 * grid_size):  # the benchmark's cap: a search that only repeats finished points ends
        search.configure_study(study, config, report_every=every, warmup_steps=warmup)
        study.optimize(objective, n_trials=1)
        trial = study.trials[-1]
        spent += int(trial.user_attrs.get("steps", 0))
        history.append((trial.state.name.lower(), trial.params, trial.user_attrs.get("steps")))
        best = min((t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), default=math.inf)
        trace.append((spent, best))
        if reached is None and reached_grid_best(grid)(spent, best):
            reached = spent
        if stop(spent, best) or spent >= grid.steps:
            break
    return {"fraction": round(reached / grid.steps, 4) if reached is not None else None,
            "trials": len(history), "history": history, "trace": trace}


@contextlib.contextmanager
def patched(strategy: Strategy):
    with contextlib.ExitStack() as stack:
        for target, replacement in strategy.patches.items():
            stack.enter_context(mock.patch(target, replacement))
        yield


def figures(fractions: list[float | None]) -> dict:
    # a search that never got there spent at least the grid's steps: counted as 1.0 in the mean and median
    spent = [1.0 if f is None else f for f in fractions]
    return {"mean": round(statistics.fmean(spent), 4), "median": round(statistics.median(spent), 4),
            "p90": round(sorted(spent)[math.ceil(0.9 * len(spent)) - 1], 4),
            "share_met": round(sum(f is not None and f <= GOAL for f in fractions) / len(fractions), 3),
            "not_reached": sum(f is None for f in fractions)}


def summarize(strategy: Strategy, fractions: list[float | None]) -> dict:
    return {"strategy": strategy.name, "summary": strategy.summary, "seeds": len(fractions), **figures(fractions),
            "seed_0_1_2": fractions[:3]}


# ---- the figures at a budget: what benchmarks/tune.py's goals measure ----

def within(grid: Grid) -> float:
    """The eval loss a search must reach: WITHIN of the grid's best (a loss, lower is better)."""
    return grid.best * (1 + WITHIN)


def best_at(trace: list[tuple[int, float]], budget: int) -> float:
    """The best value a search had finished once it had spent at most `budget` steps; a trial that crosses the
    budget is not counted (it was not finished when the budget ran out). inf when none had finished."""
    return min((best for spent, best in trace if spent <= budget), default=math.inf)


def steps_to(trace: list[tuple[int, float]], target: float) -> int | None:
    """Steps spent when the best finished value was first at or under `target`; None when never."""
    return next((spent for spent, best in trace if best <= target), None)


def budget_replay(strategy: Strategy, seed: int, grid: Grid) -> dict:
    """One search, run until it is within WITHIN of the grid's best and has spent BUDGET_SHARE of the grid's steps
    (or spent them all): its relative regret at that budget and its steps to within WITHIN."""
    budget, target = int(grid.steps * BUDGET_SHARE), within(grid)
    trace = replay(strategy, seed, grid, stop=lambda spent, best: spent >= budget and best <= target)["trace"]
    regret = best_at(trace, budget) / grid.best - 1
    return {"regret": regret, "within": regret <= WITHIN, "steps_to_within": steps_to(trace, target)}


def budget_figures(searches: list[dict], grid_steps: int) -> dict:
    """Over searches of `budget_replay`: the share within WITHIN at the budget, the median (and mean) relative
    regret there, and the median and p90 steps to within WITHIN (a search that never got there counts the grid's
    steps, a lower bound: it spent at least those)."""
    steps = sorted(grid_steps if s["steps_to_within"] is None else s["steps_to_within"] for s in searches)
    regret = statistics.median(s["regret"] for s in searches)
    mean_regret = statistics.fmean(s["regret"] for s in searches)  # where medians tie on a grid's few values
    return {"searches": len(searches),
            "within_at_budget": round(sum(s["within"] for s in searches) / len(searches), 4),
            # the share holding the grid's best point itself: what a median regret of 0 needs over half of
            "at_best_at_budget": round(sum(s["regret"] == 0 for s in searches) / len(searches), 4),
            "median_regret_at_budget": round(regret, 5) if math.isfinite(regret) else None,
            "mean_regret_at_budget": round(mean_regret, 5) if math.isfinite(mean_regret) else None,
            "steps_to_within": {"median": statistics.median(steps), "p90": steps[math.ceil(0.9 * len(steps)) - 1],
                                "not_reached": sum(s["steps_to_within"] is None for s in searches)}}


def budget_searches(strategy: Strategy, families: dict[str, list[Grid]], seeds: dict[str, int]) -> dict:
    """`budget_figures` of one strategy per family: `seeds[family]` seeds on each of the family's grids, other
    seeds on each grid (the same seeds on every landscape would make a family's searches share their start)."""
    with patched(strategy):
        searches = {family: [budget_replay(strategy, seed, grid) for k, grid in enumerate(grids)
                             for seed in range(k * seeds[family], (k + 1) * seeds[family])]
                    for family, grids in families.items()}
    return {family: budget_figures(found, families[family][0].steps) for family, found in searches.items()}


def budget_line(name: str, figures: dict) -> str:
    return f"{name}: " + "; ".join(
        f"{family} within 1% at a third {f['within_at_budget']:.3f}, median regret {f['median_regret_at_budget']}, "
        f"mean {f['mean_regret_at_budget']}, steps to 1% median {f['steps_to_within']['median']} "
        f"p90 {f['steps_to_within']['p90']}" for family, f in figures.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200, help="Seeds 0 … N-1 per strategy.")
    parser.add_argument("--strategy", action="append", help="Only these strategies (repeatable).")
    parser.add_argument("--results", type=Path, default=RESULTS, help="The benchmark's results with the grid.")
    parser.add_argument("--check-seed", type=int, help="Print this seed's replayed trials and fraction.")
    parser.add_argument("--expect", type=float, help="With --check-seed: exit 1 unless the fraction is this.")
    parser.add_argument("--json", type=Path, help="Write the table as JSON here.")
    parser.add_argument("--landscapes", type=int, default=0,
                        help="Also replay on synthetic landscapes 0 … N-1 (see above) and report their figures.")
    parser.add_argument("--landscape-seeds", type=int, default=10, help="Seeds 0 … S-1 per synthetic landscape.")
    parser.add_argument("--budget", action="store_true",
                        help="Rank by the goal at a budget instead (within 1%% at a third of the grid's steps, "
                             "benchmarks/tune.py's figures) on the city grid and --landscapes synthetic ones.")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")  # experimental-option warnings of Optuna, once per sampler
    grid = Grid.load(args.results)
    chosen = [s for s in strategies() if not args.strategy or s.name in args.strategy]

    if args.check_seed is not None:
        for strategy in chosen:
            with patched(strategy):
                result = replay(strategy, args.check_seed, grid)
            print(f"{strategy.name} seed {args.check_seed}: fraction {result['fraction']}")
            for number, (state, params, steps) in enumerate(result["history"]):
                print(f"  trial {number} {state}: {params} ({steps} steps)")
            if args.expect is not None and result["fraction"] != args.expect:
                sys.exit(f"expected {args.expect}, replayed {result['fraction']}")
        return

    landscapes = [synthetic_grid(k) for k in range(args.landscapes)]
    if args.budget:
        families = {"city": [grid], **({"synthetic": landscapes} if landscapes else {})}
        seeds = {"city": args.seeds, "synthetic": args.landscape_seeds}
        rows = []
        for strategy in chosen:
            started = time.perf_counter()
            found = budget_searches(strategy, families, seeds)
            rows.append({"strategy": strategy.name, "summary": strategy.summary, **found})
            print(f"{budget_line(strategy.name, found)}  ({time.perf_counter() - started:.0f}s)", flush=True)
            if args.json:  # after every row: a long run stopped halfway keeps what it measured
                write_table(args, grid, rows)
        return
    rows = []
    synthetic_header = f" | synthetic {'mean':>6} {'median':>6} {'<=0.33':>6} {'none':>4}" if landscapes else ""
    print(f"{'strategy':26} {'mean':>6} {'median':>6} {'p90':>6} {'<=0.33':>6} {'none':>4}{synthetic_header}"
          "  seeds 0/1/2")
    for strategy in chosen:
        started = time.perf_counter()
        with patched(strategy):
            fractions = [replay(strategy, seed, grid)["fraction"] for seed in range(args.seeds)]
            synthetic = [replay(strategy, seed, landscape)["fraction"]
                         for landscape in landscapes for seed in range(args.landscape_seeds)]
        row = summarize(strategy, fractions)
        line = (f"{row['strategy']:26} {row['mean']:6.3f} {row['median']:6.3f} {row['p90']:6.3f} "
                f"{row['share_met']:6.3f} {row['not_reached']:4d}")
        if landscapes:
            row["synthetic"] = figures(synthetic)
            line += (f" | {'':9} {row['synthetic']['mean']:6.3f} {row['synthetic']['median']:6.3f} "
                     f"{row['synthetic']['share_met']:6.3f} {row['synthetic']['not_reached']:4d}")
        rows.append(row)
        print(f"{line}  {row['seed_0_1_2']}  ({time.perf_counter() - started:.0f}s)", flush=True)
        if args.json:  # after every row: a long run stopped halfway keeps what it measured
            write_table(args, grid, rows)


def write_table(args, grid: Grid, rows: list[dict]) -> None:
    from tailor.workspace import write_json

    table = {"command": "python benchmarks/tune_replay.py " + " ".join(sys.argv[1:]),
             "grid_steps": grid.steps, "grid_best": grid.best, "goal": GOAL,
             "note": f"fractions over seeds 0-{args.seeds - 1}; a search that never reached the grid's best "
                     "counts 1.0 in mean/median/p90"}
    if args.budget:
        table.update(goal=f"within {WITHIN:.0%} of the grid's best at {BUDGET_SHARE:.3f} of its steps",
                     note=f"seeds 0-{args.seeds - 1} on the city grid; budget_figures per family")
    if args.landscapes:
        table["synthetic"] = {
            "landscapes": args.landscapes, "seeds_per_landscape": args.landscape_seeds, "first_seed": SYNTHETIC_SEED,
            "note": "each row's 'synthetic': the same figures over landscapes x seeds, each search measured against "
                    "its own landscape's grid (the family: this script's docstring)"}
    write_json(args.json, {**table, "rows": rows})


if __name__ == "__main__":
    main()
