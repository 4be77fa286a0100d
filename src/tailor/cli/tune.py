"""`tailor tune`: hyperparameter search over `tune.space` in tailor.yaml."""

from __future__ import annotations

from pathlib import Path

import typer

from tailor.cli.common import OverridesArgument, RunOption, WorkspaceOption, console, run_folder
from tailor.config import CONFIG_NAME, apply_overrides, load_raw, validate_config


def tune(overrides: list[str] = OverridesArgument, workspace: Path = WorkspaceOption, run: Path = RunOption,
         trials: int = typer.Option(None, "--trials", "-n", min=1, help=(
             "Trials the study should hold in total; a resumed study runs only the missing ones "
             "(default: tune.trials).")),
         sampler: str = typer.Option(None, "--sampler", help="grid, random or bayesian (default: tune.sampler)."),
         n_jobs: int = typer.Option(None, "--n-jobs", "-j", min=1, help=(
             "Trials at once on this machine, each in a worker process (default: tune.n_jobs).")),
         storage: str = typer.Option(None, "--storage", help=(
             "Optuna database URL shared by several workers, e.g. postgresql://user@host/tailor "
             "(default: tune.storage, else RUN/tune/study.db).")),
         study: str = typer.Option(None, "--study", help="Study name (default: tune.study, else the project).")
         ) -> None:
    """Search hyperparameters (tune.space) with Optuna: each trial trains and evaluates in RUN/tune/trial-N;
    writes RUN/tune/best.yaml and report.html. Rerun to resume; run it on several machines with one --storage."""
    from tailor.cli.stages import check_training_data
    from tailor.tune.report import metric_value, trials_table
    from tailor.tune.search import run_tune
    from tailor.tune.space import as_override

    # CLI options are tune.* overrides, so they are validated like the file
    options = {"tune.trials": trials, "tune.sampler": sampler, "tune.n_jobs": n_jobs, "tune.storage": storage,
               "tune.study": study}
    overrides = list(overrides or []) + [as_override(key, value) for key, value in options.items()
                                         if value is not None]
    path = Path(workspace) / CONFIG_NAME
    data = apply_overrides(load_raw(path), overrides)
    source = str(path) if not overrides else f"{path} (with overrides)"
    config = validate_config(data, source)
    run_dir = run_folder(path.parent, run)
    check_training_data(run_dir / "data" / "train.jsonl")

    def on_trial(trial) -> None:
        console.print(f"trial {trial.number} {trial.state.name.lower()}: {config.tune.metric} {metric_value(trial)} "
                      f"({', '.join(f'{k}={v}' for k, v in trial.params.items())})", highlight=False)

    result = run_tune(config, data, path.parent, run_dir, source=source, on_trial=on_trial)
    assert result is not None  # only a helper worker (worker > 0) returns none
    console.print(trials_table(result.study, result.metric))
    finished = sum(trial.state.name in ("COMPLETE", "PRUNED") for trial in result.study.trials)
    console.print(f"[green]best[/] trial {result.best_trial}: {result.metric} {result.best_value:.4f} "
                  f"({result.trials_run} trial(s) run by this process, {finished} finished in the study)",
                  highlight=False)
    console.print(f"best config: {result.best_config}", soft_wrap=True, highlight=False)
    console.print(f"html report: {result.report}", soft_wrap=True, highlight=False)
    console.print(f"study: {result.study_name} in {result.storage}", soft_wrap=True, highlight=False)
