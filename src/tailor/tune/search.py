"""Hyperparameter search with Optuna: each trial trains and evaluates in its own folder `RUN/tune/trial-N/`.

The study lives in a database (SQLite `RUN/tune/study.db` by default), so an interrupted search resumes where it
stopped and several processes or machines can work on one study through a shared URL (e.g. PostgreSQL).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tailor.config import TailorConfig, apply_overrides, dump_config
from tailor.errors import TailorError
from tailor.tune.report import metric_value, write_tune_report
from tailor.tune.space import check_values, config_with, grid, params_to_values, sample, second_chance, untried_first
from tailor.workspace import atomic_write_text, derive_run_folder

TUNE_DIR = "tune"
BEST_CONFIG = "best.yaml"
STUDY_DB = "study.db"
DEFAULT_TRIALS = 20
LOWER_IS_BETTER = ("eval_loss", "perplexity")


@dataclass
class TuneResult:
    study_name: str
    storage: str
    direction: str
    metric: str
    trials_run: int  # by this call; earlier runs of a resumed study are not counted
    best_value: float
    best_values: dict[str, Any]
    best_trial: int
    best_config: Path
    report: Path
    study: Any  # the optuna.Study, for tables and plots


def direction_of(config: TailorConfig) -> Literal["minimize", "maximize"]:
    return config.tune.direction or ("minimize" if config.tune.metric in LOWER_IS_BETTER else "maximize")


def storage_url(config: TailorConfig, run_dir: Path) -> str:
    if config.tune.storage:
        return config.tune.storage
    tune_dir = Path(run_dir) / TUNE_DIR
    tune_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(tune_dir / STUDY_DB).resolve()}"


def open_study(config: TailorConfig, run_dir: Path, *, worker: int = 0, report_every: int = 1,
               warmup_steps: int = 0):
    """Create the study, or load it when it exists (`load_if_exists`): that is what makes resuming work.

    `worker` numbers the processes of one `--n-jobs` run; each seeds its sampler differently.
    """
    import optuna

    url = storage_url(config, run_dir)
    # SQLite locks the whole file per write: wait for another worker instead of failing at once
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # heartbeats let a later run mark trials of a killed worker as failed (and run them again) after the grace
    # period; Ctrl-C marks its trial failed at once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for attempt in range(3):  # two workers creating the tables of a fresh database at once can collide
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=60,
                                                     grace_period=180)
                study = optuna.create_study(storage=storage, study_name=config.tune.study or config.project,
                                            direction=direction_of(config), load_if_exists=True)
                break
            except Exception as exc:  # noqa: BLE001 (sqlalchemy's errors depend on the database driver)
                if attempt == 2:
                    raise TailorError(f"tune.storage: cannot open the study at {url} ({exc})") from None
                time.sleep(1 + attempt)
    if study.direction.name.lower() != direction_of(config):
        raise TailorError(f"tune.direction: the study '{study.study_name}' in {url} was created to "
                          f"{study.direction.name.lower()}; use another tune.study name to {direction_of(config)}")
    configure_study(study, config, worker=worker, report_every=report_every, warmup_steps=warmup_steps)
    return study


def configure_study(study, config: TailorConfig, *, worker: int = 0, report_every: int = 1,
                    warmup_steps: int = 0) -> None:
    """Give an opened study tailor's sampler and pruner (benchmarks/tune_replay.py replays studies with it)."""
    study.sampler = _sampler(config, sampler_seed(config.tune.seed, len(study.trials), worker))
    study.pruner = _pruner(config, report_every, warmup_steps)


def sampler_seed(seed: int, trials: int, worker: int) -> int:
    """The sampler's seed for a study opened with `trials` trials by `worker`. A resumed study must not propose its
    first trials again, and parallel workers must not all propose the same values, so each gets a seed derived from
    (seed, trials, worker) by hashing, not by adding: with `seed + trials`, seed 0 resumed after one trial proposed
    what seed 1 did, so searches with neighbouring seeds repeated each other's trials. A fresh study is hashed too,
    so that no seed proposes what a study resumed under the additive rule did."""
    import numpy as np

    return int(np.random.SeedSequence([seed % 2**32, trials, worker]).generate_state(1)[0])


def _sampler(config: TailorConfig, seed: int):
    import optuna

    if config.tune.sampler == "grid":
        return optuna.samplers.GridSampler(grid(config.tune.space), seed=seed)
    if config.tune.sampler == "random":
        return untried_first(optuna.samplers.RandomSampler(seed=seed), config.tune.space, seed)
    return untried_first(optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.tune.startup_trials),
                         config.tune.space, seed)


def report_interval(config: TailorConfig, n_train: int) -> int:
    """Steps between the eval losses every trial reports. One interval for all trials, even when the space
    changes their length: the pruners compare trials at the same step."""
    from tailor.train.loop import total_steps

    return config.tune.report_every or config.train.eval_every or max(1, total_steps(n_train, config.train) // 4)


def pruner_warmup(config: TailorConfig, n_train: int, every: int) -> int:
    """Steps a trial trains before it may be pruned: tune.pruner_warmup_steps, else a third of the configured run
    (successive halving: the first report).

    The median pruner stops everything under the median: at its first report that mostly ranks learning rates by
    how fast they start (a high one drops fastest, then overshoots), not by where they end. Successive halving
    only stops what is outside the best third at a rung, and each trial it stops at the first report costs one
    report interval: replayed on the recorded city grid and 1,000 synthetic searches (benchmarks/tune.py), a first
    rung at the first report reached within 1% of the grid's best at a third of its steps in 93% / 91% of the
    searches, against 82% / 89% with the rung at a third of the run and 75% / 82% for the median pruner."""
    from tailor.train.loop import total_steps

    if config.tune.pruner_warmup_steps is not None:
        return config.tune.pruner_warmup_steps
    if config.tune.pruner == "successive_halving":
        return every
    return max(every, total_steps(n_train, config.train) // 3)


def _pruner(config: TailorConfig, every: int, warmup: int = 0):
    import optuna

    if config.tune.pruner == "median":
        # the first trials only set the bar: pruning against the median of one or two trials is noise
        return optuna.pruners.MedianPruner(n_startup_trials=min(3, config.tune.startup_trials),
                                           n_warmup_steps=warmup)
    # resources are training steps: the first rung (the smallest bracket's) is the warm-up, at least one report
    if config.tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(every, warmup), reduction_factor=3)
    if config.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(every, warmup), max_resource="auto",
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def total_trials(config: TailorConfig) -> int:
    if config.tune.trials:
        return config.tune.trials
    if config.tune.sampler == "grid":
        sizes = [len(points) for points in grid(config.tune.space).values()]
        return max(1, math.prod(sizes))
    return DEFAULT_TRIALS


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as lines:
        return sum(1 for line in lines if line.strip())


def _start_helpers(config: TailorConfig, data: dict, root: Path, run_dir: Path, source: str) -> list:
    """`--n-jobs J`: J - 1 more worker processes on the same study, the way other machines join it.

    Processes, not `study.optimize(n_jobs=J)` threads: loading a model in transformers is not thread-safe (weights
    start on a process-wide meta device; two threads loading at once fail with "Cannot copy out of meta tensor"),
    and the study's storage already coordinates processes. Each worker gets an equal share of the CPU threads.
    """
    import multiprocessing

    import torch

    jobs = config.tune.n_jobs
    helper_data = apply_overrides(data, ["tune.n_jobs=1"])
    helper_config = config.model_copy(update={"tune": config.tune.model_copy(update={"n_jobs": 1})})
    # spawn, not fork: this process may hold torch thread pools and database connections a child must not share
    context = multiprocessing.get_context("spawn")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))  # this process is worker 0
    helpers = []
    for worker in range(1, jobs):
        helper = context.Process(target=_helper_main, name=f"tune-worker-{worker}",
                                 args=(helper_config, helper_data, root, run_dir, source, worker, jobs))
        helper.start()
        helpers.append(helper)
    return helpers


def _helper_main(config, data, root, run_dir, source, worker, jobs) -> None:
    import sys

    import torch
    from transformers.utils import logging as hf_logging

    # a spawned process starts without the command's settings: one share of the CPU, no library chatter
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        run_tune(config, data, root, run_dir, source=source, worker=worker, on_trial=lambda trial: print(
            f"trial {trial.number} {trial.state.name.lower()} (worker {worker}): {config.tune.metric} "
            f"{metric_value(trial)}", flush=True))
    except TailorError as exc:
        print(f"error (tune worker {worker}): {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def _join(helper) -> int:
    try:
        helper.join()
    except KeyboardInterrupt:
        helper.terminate()  # its running trial is marked failed by the heartbeat and run again on resume
        raise
    return helper.exitcode


class PruningReporter:
    """The training core's `should_stop`: at each eval, report the eval loss to the trial and ask the pruner.

    The eval loss is negated when the objective is maximized, because the pruner compares intermediate values in
    the study's direction: a low loss must look good to a maximizing study. The last step is reported but never
    pruned: its training is already paid for, and a finished trial tells the sampler more than a pruned one.
    """

    def __init__(self, trial, metrics_path: Path, every: int, maximize: bool, last_step: int):
        self.trial, self.metrics_path, self.every, self.sign = trial, metrics_path, every, -1.0 if maximize else 1.0
        self.last_step = last_step
        self.checked_step, self.pruned, self.last_loss = 0, False, float("nan")
        # a pruned point trained again (reuse_same_point) runs to the end: its pruner would stop it at the same rung
        self.second_chance = "second_chance" in trial.user_attrs

    def __call__(self, step: int) -> bool:
        # run_training asks once more after the loop; answer that from memory, never report a step twice
        if step <= self.checked_step or step % self.every:
            return self.pruned
        self.checked_step = step
        eval_loss = self._eval_loss(step)
        if eval_loss is None:
            return False
        self.last_loss = eval_loss
        self.trial.report(self.sign * eval_loss, step)
        self.pruned = step < self.last_step and not self.second_chance and self.trial.should_prune()
        return self.pruned

    def _eval_loss(self, step: int) -> float | None:
        # the core writes the step's metrics line (with eval_loss) before it calls should_stop
        for line in reversed(self.metrics_path.read_text(encoding="utf-8").splitlines()):
            record = json.loads(line)
            if record.get("step") == step:
                return record.get("eval_loss")
            if record.get("step", 0) < step:
                return None
        return None


def _same_point(study, trial):
    """A finished trial of the study with exactly this trial's values, else None."""
    import optuna

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    same = [other for other in study.get_trials(deepcopy=False, states=finished)
            if other.number != trial.number and other.params == trial.params]
    # a point pruned once and then trained to the end (its second chance) is its finished trial
    return min(same, key=lambda other: (other.state != optuna.trial.TrialState.COMPLETE, other.number), default=None)


def reuse_same_point(study, trial) -> float | None:
    """The result of a finished trial at this trial's values (0 steps), or None when the point is new.

    A point comes again once every point of a finite space is tried (UntriedFirst avoids it before): its result
    is reused, not retrained. A pruned point's second chance (`second_chance`: the pruned point that looked best at
    the first report) is trained to the end, unpruned; any other repeat of a pruned trial is pruned again (raises
    optuna.TrialPruned)."""
    import optuna

    repeated = _same_point(study, trial)
    if repeated is None:
        return None
    if repeated.state == optuna.trial.TrialState.PRUNED and \
            second_chance(study, list(trial.params), trial.number) == tuple(trial.params.values()):
        trial.set_user_attr("second_chance", repeated.number)  # PruningReporter does not prune it
        return None
    trial.set_user_attr("steps", 0)
    trial.set_user_attr("repeats", repeated.number)
    for step, value in sorted(repeated.intermediate_values.items()):  # the pruners compare these
        trial.report(value, step)
    if repeated.state == optuna.trial.TrialState.PRUNED:
        raise optuna.TrialPruned(f"same values as pruned trial {repeated.number}")
    trial.set_user_attr("metrics", repeated.user_attrs.get("metrics", {}))
    return float(repeated.value)


def run_tune(config: TailorConfig, data: dict, root: Path, run_dir: Path, *, source: str = "tailor.yaml",
             on_trial: Callable[[Any], None] | None = None, worker: int = 0) -> TuneResult | None:
    """Run the search `config.tune` describes on RUN/data; `data` is the raw config (best.yaml starts from it)."""
    import optuna

    from tailor.evaluate.harness import run_eval
    from tailor.train.loop import total_steps
    from tailor.train.run import BuildResult, run_training

    run_dir = Path(run_dir)
    space, tune = config.tune.space, config.tune
    # every check before the first model loads: an empty space, a bad value or grid, missing data
    if not space:
        raise TailorError("tune.space: empty; declare the options to search, e.g. "
                          "tune.space: {train.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}}")
    check_values(data, space, source)
    grid_space = grid(space) if tune.sampler == "grid" else None
    if tune.metric == "adherence" and not config.eval.rules:
        raise TailorError("tune.metric: adherence needs eval.rules")
    train_path = run_dir / "data" / "train.jsonl"
    if not train_path.is_file() or not (run_dir / "data" / "eval.jsonl").is_file():
        raise TailorError(f"{run_dir / 'data'}: train.jsonl and eval.jsonl are needed; run `tailor data build`")
    n_train = _count_lines(train_path)
    every = report_interval(config, n_train)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(config, run_dir, worker=worker, report_every=every,
                       warmup_steps=pruner_warmup(config, n_train, every))
    direction = direction_of(config)
    target = total_trials(config)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    remaining = max(0, target - done)
    tune_dir = run_dir / TUNE_DIR

    def objective(trial) -> float:
        values = sample(trial, space, grid_space)
        reused = reuse_same_point(study, trial)
        if reused is not None:
            return reused
        trial_config = config_with(data, values, f"{source} (trial {trial.number})")
        # the core computes the eval loss every `every` steps; checkpoints are not needed by a trial
        trial_config.train.eval_every, trial_config.train.save_every = every, 0
        trial_dir = tune_dir / f"trial-{trial.number}"
        derive_run_folder(run_dir, trial_dir)  # RUN's corpus, data and index, linked
        reporter = PruningReporter(trial, trial_dir / "metrics.jsonl", every, maximize=direction == "maximize",
                                   last_step=total_steps(n_train, trial_config.train))
        started = time.perf_counter()
        result = run_training(trial_config, root, trial_dir, show_progress=False, should_stop=reporter)
        steps = 0 if isinstance(result, BuildResult) else result.steps  # a method that builds trains no step
        trial.set_user_attr("steps", steps)
        shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)  # a pruned trial's stop checkpoint
        if reporter.pruned:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
            raise optuna.TrialPruned(f"eval loss {reporter.last_loss:.4f} at step {steps}")
        # the base model is the same in every trial: only the customized one is scored
        report = run_eval(trial_config, root, trial_dir, show_progress=False, write_html=False,
                          only_customized=True)
        scores = report["models"][trial_config.train.method]
        trial.set_user_attr("metrics", {k: v for k, v in scores.items() if isinstance(v, int | float)})
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        if tune.metric not in scores:
            raise TailorError(f"tune.metric: the evaluation has no '{tune.metric}'")
        return float(scores[tune.metric])

    ran_here: list[int] = []  # trials this process finished; other workers' trials are in the study too
    callbacks = [
        # workers sharing the study stop once finished + running trials reach the total, so together they run
        # about `target` trials instead of each running its own `remaining`
        optuna.study.MaxTrialsCallback(target, states=(*finished, optuna.trial.TrialState.RUNNING)),
        lambda study, trial: ran_here.append(trial.number) if trial.state in finished else None,
    ]
    if on_trial is not None:
        callbacks.append(lambda study, trial: on_trial(trial))
    helpers = _start_helpers(config, data, root, run_dir, source) if remaining and tune.n_jobs > 1 else []
    try:
        if remaining:
            study.optimize(objective, n_trials=remaining, n_jobs=1, callbacks=callbacks, catch=(),
                           gc_after_trial=True)
    except BaseException:
        for helper in helpers:  # their running trials are marked failed by the heartbeat and rerun on resume
            helper.terminate()
        raise
    failed = [helper.name for helper in helpers if _join(helper) != 0]
    if failed:
        raise TailorError(f"{len(failed)} of the --n-jobs worker processes failed; see their errors above")
    trials_run = len(ran_here)
    if worker:
        return None  # the first process writes best.yaml and the report, once every worker has finished

    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        raise TailorError(f"no trial of study '{study.study_name}' completed; see the errors above")
    best = study.best_trial
    best_values = params_to_values(best.params, space)
    best_config = config_with(data, best_values, f"{source} (best trial)")
    best_path = tune_dir / BEST_CONFIG
    header = (f"# Best of study '{study.study_name}': trial {best.number}, {tune.metric} = {best.value:.4f} "
              f"({direction}).\n# Searched values: "
              + ", ".join(f"{k}={json.dumps(v)}" for k, v in best_values.items())
              + ".\n# Copy it over the workspace's tailor.yaml to train with it.\n")
    atomic_write_text(best_path, header + dump_config(best_config))
    report_path = write_tune_report(study, tune_dir, metric=tune.metric, direction=direction)
    return TuneResult(study_name=study.study_name, storage=storage_url(config, run_dir), direction=direction,
                      metric=tune.metric, trials_run=trials_run, best_value=float(best.value),
                      best_values=best_values, best_trial=best.number, best_config=best_path, report=report_path,
                      study=study)

